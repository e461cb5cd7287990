"""Distillation from the dense model while the pruned model fine-tunes.

``--teacher_model`` (the dense original, or any model with the same tokenizer) and
``--distill_loss``:

- ``kl``: the token-level KL(teacher || student) of the next-token distributions at temperature
  ``T`` (times ``T**2``, so that gradients keep their scale);
- ``kl+ce``: the cross-entropy plus ``distill_weight`` x the KL;
- ``squarehead``: the KL plus ``distill_weight`` x SquareHead (Kurtic et al. 2023): for every
  decoder layer, the mean squared error of the student's hidden states against the teacher's,
  divided by the variance of the teacher's, averaged over the layers.

The teacher runs without gradients in the training precision, is not part of the model the
Trainer saves or optimizes, and never holds more than ``distill_chunk_tokens`` positions of
logits: it returns hidden states, and each chunk's logits and KL are recomputed in backward
instead of kept. Evaluation stays the plain cross-entropy, so perplexities compare across
runs. Each logged step carries the cross-entropy and each distillation term.
"""

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .errors import UserError, first_line
from .modeling import DTYPES, load_model
from .output_dir import same_directory
from .sparse_trainer import SparseLoraTrainer, SparseTrainer
from .sparsity import sparsity_pattern

LOSSES = ("kl", "kl+ce", "squarehead")
_PLACEMENT_KWARGS = {"dtype", "torch_dtype", "device_map"}  # the training's: one teacher per process, its precision


@dataclass
class DistillationArguments:
    teacher_model: str | None = field(default=None, metadata={
        "help": "Dense teacher to distill from (a local directory or a Hub id); off when not given."})
    distill_loss: str = field(default="kl+ce", metadata={"help": "What to optimize with a teacher.",
                                                         "choices": list(LOSSES)})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL."})
    distill_weight: float = field(default=1.0, metadata={
        "help": "Weight of the KL in kl+ce, of the SquareHead term in squarehead."})
    distill_chunk_tokens: int = field(default=1024, metadata={
        "help": "Positions of teacher logits computed at once (bounds their memory)."})
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata={
        "help": "The teacher's from_pretrained keyword arguments, a JSON object, as TRL's: "
                "'{\"quantization_config\": {\"load_in_4bit\": true}}' loads it in 4-bit (less memory, a teacher "
                "less exact than the dense model). Its dtype and device are the training's."})

    def validate(self, student: str) -> None:
        if self.teacher_model is None:
            if self.teacher_model_init_kwargs:
                raise UserError("--teacher_model_init_kwargs goes with --teacher_model")
            return
        if same_directory(self.teacher_model, student):
            raise UserError(f"--teacher_model {self.teacher_model} is the model being fine-tuned: its KL to itself is "
                            "0; give the dense model it was pruned from")
        if (not 0 < self.distill_temperature < math.inf or not 0 <= self.distill_weight < math.inf
                or self.distill_chunk_tokens < 1):
            raise UserError("distillation needs a finite --distill_temperature > 0, a finite --distill_weight >= 0 "
                            "and --distill_chunk_tokens >= 1")
        self.init_kwargs()

    def init_kwargs(self) -> dict:
        """``--teacher_model_init_kwargs`` as a dict; refuses what is not a JSON object, or sets the placement."""
        kwargs = self.teacher_model_init_kwargs or {}
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as error:
                raise UserError(f"--teacher_model_init_kwargs is not valid JSON: {error}") from None
        if not isinstance(kwargs, dict):
            raise UserError(f"--teacher_model_init_kwargs must be a JSON object, got {json.dumps(kwargs)}")
        if placement := sorted(_PLACEMENT_KWARGS & kwargs.keys()):
            raise UserError(f"--teacher_model_init_kwargs cannot set {', '.join(placement)}: the teacher runs in the "
                            "training precision, on each process's device")
        return kwargs


def load_teacher(args: DistillationArguments, student, student_tokenizer, training_args, **hub_kwargs):
    """The teacher on this process's device, in the training precision, frozen; refuses one that does not match.
    ``hub_kwargs`` (the student's ``cache_dir``, ``token`` and ``trust_remote_code``) go to its ``from_pretrained``,
    unless --teacher_model_init_kwargs sets them."""
    if training_args.fsdp:
        raise UserError("--teacher_model with --fsdp is not supported: every rank would hold the whole teacher "
                        "unsharded; train with DDP (one teacher per GPU) or without a teacher")
    dtype = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else _dtype_name(student)
    kwargs = args.init_kwargs()
    try:  # loaded on the device it runs on: a quantized teacher is quantized there, and cannot move afterwards
        teacher, tokenizer = load_model(args.teacher_model, dtype, device_map={"": training_args.device},
                                        **{**hub_kwargs, **kwargs})
    except (ImportError, TypeError, ValueError) as error:
        if not kwargs:
            raise
        raise UserError(f"--teacher_model_init_kwargs: {first_line(error)}") from None
    check_teacher(teacher, tokenizer, student, student_tokenizer, args.distill_loss)
    teacher.requires_grad_(False)
    return teacher.eval()


def _dtype_name(model) -> str:
    return next(name for name, dtype in DTYPES.items() if dtype == model.dtype)


def check_teacher(teacher, tokenizer, student, student_tokenizer, loss: str) -> None:
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) differs from the student's "
                        f"({student.config.vocab_size}): distillation compares their next-token distributions")
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError("the teacher's tokenizer differs from the student's: their token ids would not mean the same")
    if sparsity_pattern(teacher.config) is not None:
        warnings.warn("the teacher has a sparsity_pattern: it is pruned itself; the dense model the student was "
                      "pruned from is the teacher that distillation is measured with", stacklevel=2)
    if loss == "squarehead":
        shapes = [(model.config.num_hidden_layers, model.config.hidden_size) for model in (teacher, student)]
        if shapes[0] != shapes[1]:
            raise UserError(f"squarehead compares hidden states layer by layer: the teacher has {shapes[0][0]} "
                            f"layers of {shapes[0][1]}, the student {shapes[1][0]} of {shapes[1][1]}; use "
                            "--distill_loss kl or kl+ce")


def chunked_kl(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: torch.nn.Module,
               valid: torch.Tensor, temperature: float, chunk_tokens: int) -> torch.Tensor:
    """Mean over ``valid`` positions of KL(teacher || student), the teacher's logits made ``chunk_tokens`` at a time.

    ``student_logits`` (batch, positions, vocab) and ``teacher_hidden`` (batch, positions, hidden) are
    aligned position by position.
    """
    def kl_per_position(student, hidden):
        teacher_log = F.log_softmax(teacher_head(hidden).float() / temperature, dim=-1)
        student_log = F.log_softmax(student.float() / temperature, dim=-1)
        return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)

    total = student_logits.new_zeros((), dtype=torch.float32)
    for row in range(student_logits.shape[0]):
        for start in range(0, student_logits.shape[1], chunk_tokens):
            positions = slice(start, start + chunk_tokens)
            kl = checkpoint(kl_per_position, student_logits[row, positions], teacher_hidden[row, positions],
                            use_reentrant=False)
            total = total + (kl * valid[row, positions]).sum()
    return total * temperature**2 / valid.sum().clamp(min=1)


def squarehead(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over decoder layers of MSE(student, teacher) / Var(teacher) (the embeddings' output is left out)."""
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().var().clamp(min=1e-8)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)]
    return torch.stack(terms).mean()


class DistillationMixin:
    """Adds the teacher's terms to a sparse trainer's training loss; list it first among the bases."""

    def __init__(self, *args, teacher, distillation: DistillationArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distillation = distillation
        self.loss_is_scaled_for_ga = False  # per-micro-batch means: the Trainer divides by the accumulation
        self._logged_terms = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain cross-entropy, comparable across runs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        kind = self.distillation.distill_loss
        labels = inputs["labels"]
        if self.label_smoother is not None:  # the model's own cross-entropy would be computed for nothing
            inputs = {name: value for name, value in inputs.items() if name != "labels"}
        outputs = model(**inputs, output_hidden_states=kind == "squarehead")
        with torch.no_grad():
            teacher = self.teacher.base_model(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask"),
                                              output_hidden_states=kind == "squarehead")
        valid = (labels[:, 1:] != -100).float()
        ce = outputs.loss if self.label_smoother is None else self.label_smoother(outputs, labels, shift_labels=True)
        terms = {"ce": ce,
                 "kl": chunked_kl(outputs.logits[:, :-1], teacher.last_hidden_state[:, :-1],
                                  self.teacher.get_output_embeddings(), valid,
                                  self.distillation.distill_temperature, self.distillation.distill_chunk_tokens)}
        weight = self.distillation.distill_weight
        if kind == "kl":
            loss = terms["kl"]
        elif kind == "kl+ce":
            loss = terms["ce"] + weight * terms["kl"]
        else:
            terms["squarehead"] = squarehead(outputs.hidden_states, teacher.hidden_states)
            loss = terms["kl"] + weight * terms["squarehead"]
        for name, value in terms.items():
            self._logged_terms[name].append(value.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._logged_terms:  # a training log: the mean of each term since the last one
            logs.update({f"{name}_loss": torch.stack(values).mean().item()
                         for name, values in self._logged_terms.items()})
            self._logged_terms.clear()
        super().log(logs, start_time)


class DistillingSparseTrainer(DistillationMixin, SparseTrainer):
    """``SparseTrainer`` learning from a teacher as well."""


class DistillingSparseLoraTrainer(DistillationMixin, SparseLoraTrainer):
    """``SparseLoraTrainer`` learning from a teacher as well."""
