"""The flags of ``dense_ft/finetune.py``: run_clm.py's, sparse LoRA's and distillation's, and every
``transformers.TrainingArguments`` flag; each group checks its own values before anything loads.

``finetune.py args.json`` reads the same flags from a JSON object, as run_clm.py does.
"""

import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import torch
from transformers import BitsAndBytesConfig, HfArgumentParser, TrainingArguments
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import is_liger_kernel_available

from dense_ft.checkpoints import is_complete
from dense_ft.distillation import DistillationArguments
from dense_ft.errors import UserError, first_line
from dense_ft.modeling import DTYPES
from dense_ft.output_dir import check_output_path
from dense_ft.sparse_lora import LLAMA_TARGET_MODULES
from dense_ft.text import file_builder


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Pruned model: a local directory or a Hub id."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Where the models and data sets fetched from the Hub are stored, if not in the Hugging Face cache."})
    model_revision: str = field(default="main", metadata={"help": "The model's branch, tag or commit on the Hub."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "The tokenizer, if not the pruned model's (a model saved without one): a local directory or a Hub "
                "id, at its main revision. It is saved with the fine-tuned model."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the code that the model (and its tokenizer and teacher) come with, for an architecture "
                "transformers does not hold: read it first."})
    token: str | None = field(default=None, metadata={
        "help": "Hub token for private and gated models and data sets, if not $HF_TOKEN or the one `hf auth login` "
                "saved."})
    torch_dtype: str = field(default="float32", metadata={  # --dtype: run_clm.py's newer name
        "help": "Weight dtype.", "choices": list(DTYPES), "aliases": ["--dtype"]})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Sparse QLoRA (with --lora): the pruned model's linear weights are loaded in 4-bit (bitsandbytes) "
                "and the adapters train on them; at the end the adapter is merged into the pruned model "
                "unquantized, in --torch_dtype."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "Quantize the 4-bit weights' scales as well (nested quantization): less memory."})

    def validate(self, lora_args: "LoraArguments") -> None:
        if self.cache_dir:
            check_output_path(self.cache_dir, "--cache_dir")
        if self.use_bnb_nested_quant and not self.load_in_4bit:
            raise UserError("--use_bnb_nested_quant goes with --load_in_4bit")
        if not self.load_in_4bit:
            return
        if not lora_args.lora:
            raise UserError("--load_in_4bit freezes the weights in 4-bit, where they cannot train: add --lora "
                            "(sparse QLoRA)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--load_in_4bit needs bitsandbytes: pip install bitsandbytes")

    def hub_kwargs(self) -> dict:
        """Where files fetched from the Hub are stored, and the token that fetches them: for the model, its data and
        its teacher alike."""
        return {"cache_dir": self.cache_dir, "token": self.token}

    def source_kwargs(self) -> dict:
        """``from_pretrained``'s arguments that say where the pruned model's files come from, and whether their code
        may run."""
        return {**self.hub_kwargs(), "revision": self.model_revision, "trust_remote_code": self.trust_remote_code}

    def loading_kwargs(self, device) -> dict:
        """``from_pretrained``'s arguments for the pruned model as it trains: from its source, in 4-bit quantized on
        this process's device with --load_in_4bit."""
        kwargs = self.source_kwargs()
        if not self.load_in_4bit:
            return kwargs
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                    bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
                                    bnb_4bit_compute_dtype=DTYPES[self.torch_dtype])
        return {**kwargs, "quantization_config": config, "device_map": {"": device}}

    def describe_4bit(self) -> str:
        return f"4-bit {self.bnb_4bit_quant_type}{' with nested quantization' if self.use_bnb_nested_quant else ''}"


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. wikitext-2-raw-v1."})
    dataset_dir: str | None = field(default=None, metadata={"help": "Local dir with wiki.{train,valid}.raw."})
    train_file: str | None = field(default=None, metadata={
        "help": "Training file: plain text, or CSV or JSON (lines) with a text column."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file, of the same kind."})
    validation_split_percentage: int = field(default=5, metadata={
        "help": "Data without a validation split (--dataset_name, --train_file alone): the first this percent of "
                "the training rows is held out for validation (0: none)."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training sequences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation sequences."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Tokenization processes."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Tokenize and group again instead of reusing the data sets' cache."})
    keep_linebreaks: bool = field(default=True, metadata={
        "help": "Keep each line's line break in plain text files (False: the lines are joined without one)."})
    streaming: bool = field(default=False, metadata={
        "help": "Read the data as a stream, tokenized as it is read, in order, neither downloaded whole nor cached "
                "(for corpora too large for the disk, e.g. C4); needs --max_steps. Without a validation split, "
                "--validation_split_percentage rows of every 100 are held out."})

    def describe_source(self) -> str:
        if self.dataset_name:
            return f"data set {self.dataset_name!r}"
        return self.dataset_dir or " and ".join(path for path in (self.train_file, self.validation_file) if path)

    def validate(self, training_args: TrainingArguments) -> None:
        if self.block_size < 1:
            raise UserError(f"--block_size must be a positive number of tokens, got {self.block_size}")
        for flag, minimum in (("max_train_samples", 1), ("max_eval_samples", 1), ("preprocessing_num_workers", 0)):
            if getattr(self, flag) is not None and getattr(self, flag) < minimum:
                raise UserError(f"--{flag} must be {minimum} or more, got {getattr(self, flag)}")
        sources = [f"--{flag}" for flag in ("dataset_dir", "train_file", "dataset_name") if getattr(self, flag)]
        if len(sources) > 1:
            raise UserError(f"give one source of training data, not {' and '.join(sources)}")
        if self.validation_file and not self.train_file:
            raise UserError("--validation_file goes with --train_file (--dataset_dir and --dataset_name bring their "
                            "own validation split)")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError("--validation_split_percentage must be in [0, 100), got "
                            f"{self.validation_split_percentage}")
        not_plain_text = self.dataset_name or self.train_file and file_builder(self.train_file) != "text"
        if not self.keep_linebreaks and not_plain_text:
            raise UserError("--keep_linebreaks applies to plain text files (--train_file, --dataset_dir), not to "
                            f"{self.dataset_name or self.train_file}")
        if self.streaming:
            self._check_streaming(training_args)

    def _check_streaming(self, training_args: TrainingArguments) -> None:
        if training_args.max_steps <= 0:
            raise UserError("--streaming needs --max_steps: a stream has no length to count epochs by")
        for flag in ("preprocessing_num_workers", "overwrite_cache"):
            if getattr(self, flag):
                raise UserError(f"--{flag} does not apply to --streaming: a stream is tokenized as it is read, "
                                "by the training process, and never cached")


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train sparse LoRA adapters instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the adapters' input (above 0 the update needs its own matmul: slower)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES),
                                           metadata={"help": "Module names that get adapters, or all-linear."})

    def validate(self, training_args: TrainingArguments) -> None:
        if not self.lora:
            return
        if self.lora_r < 1 or not 0 < self.lora_alpha < math.inf or not 0 <= self.lora_dropout < 1:
            raise UserError("--lora needs --lora_r >= 1, a finite --lora_alpha > 0 and --lora_dropout in [0, 1)")
        if training_args.fsdp:
            raise UserError("--lora trains with DDP (a full replica per GPU); FSDP2 is not supported with sparse "
                            "LoRA: drop --fsdp")


@dataclass
class SparseTrainingArguments(TrainingArguments):
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over instead of resuming from the last checkpoint in output_dir."}
    )
    effective_batch_size: int | None = field(default=None, metadata={
        "help": "Sequences per optimizer step over all processes: sets --gradient_accumulation_steps to it / "
                "(per-device batch x world size), for whatever launcher started the run."})
    nonfinite_patience: int = field(default=0, metadata={
        "help": "Optimizer steps in a row with a non-finite loss or gradient norm to skip before the run stops "
                "(0: stop at the first)."})

    def validate(self) -> None:
        self._check_counts_and_length()
        self._check_optimizer_settings()
        self._check_integrations()
        checkpoint = self.resume_from_checkpoint
        if checkpoint and not os.path.isdir(checkpoint):
            raise UserError(f"--resume_from_checkpoint {checkpoint} not found")
        # A checkpoint saved by another trainer has no marker; its trainer state is written last.
        if checkpoint and not (is_complete(checkpoint) or os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME))):
            raise UserError(f"--resume_from_checkpoint {checkpoint} is an incomplete checkpoint (its save was cut "
                            "short): give an earlier one")

    def _check_counts_and_length(self) -> None:
        for flag, minimum in (("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1),
                              ("gradient_accumulation_steps", 1), ("dataloader_num_workers", 0)):
            if getattr(self, flag) < minimum:
                raise UserError(f"--{flag} must be {minimum} or more, got {getattr(self, flag)}")
        if not 0 <= self.seed < 2**32:  # numpy's range: the Trainer seeds it too
            raise UserError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.max_steps <= 0 and not 0 < self.num_train_epochs < math.inf:
            raise UserError(f"--num_train_epochs must be a positive finite number (or give --max_steps), got "
                            f"{self.num_train_epochs}")

    def _check_optimizer_settings(self) -> None:
        """What the Trainer's optimizers refuse only once training has started (a traceback), or not at all."""
        if not 0 < self.learning_rate < math.inf:
            raise UserError(f"--learning_rate must be a positive finite number, got {self.learning_rate}")
        for flag in ("weight_decay", "adam_epsilon"):
            if not 0 <= getattr(self, flag) < math.inf:
                raise UserError(f"--{flag} must be a finite number >= 0, got {getattr(self, flag)}")
        for flag in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        # AdamW's first step moves each weight by lr / (1 - beta1); torch's unfused AdamW cannot even hold that
        if self.learning_rate / (1 - self.adam_beta1) > torch.finfo(torch.float32).max:
            raise UserError(f"--learning_rate {self.learning_rate:g} is far too high: the optimizer's first step "
                            "(learning rate / (1 - adam_beta1)) overflows float32")
        if self.max_grad_norm is not None and math.isnan(self.max_grad_norm):
            raise UserError("--max_grad_norm must be a number (0 or less: no clipping), got nan")

    def _check_integrations(self) -> None:
        """An unknown --report_to, or an integration whose package is missing, is a traceback from the Trainer once
        the model is loaded."""
        try:
            for callback in get_reporting_integration_callbacks(self.report_to):
                callback()  # each integration's constructor checks that its package imports
        except (ValueError, RuntimeError) as error:
            raise UserError(f"--report_to: {first_line(error)}") from None
        if self.use_liger_kernel and not is_liger_kernel_available():
            raise UserError("--use_liger_kernel needs liger-kernel >= 0.3.0 (pip install liger-kernel)")

    def apply_effective_batch_size(self) -> None:
        """Derive the accumulation from the world size, or refuse a world size that cannot reach the batch."""
        if self.effective_batch_size is None:
            return
        if self.gradient_accumulation_steps != 1:
            raise UserError("give --effective_batch_size or --gradient_accumulation_steps, not both")
        if self.effective_batch_size < 1:
            raise UserError(f"--effective_batch_size must be 1 or more, got {self.effective_batch_size}")
        per_step = self.per_device_train_batch_size * self.world_size
        if self.effective_batch_size % per_step:
            raise UserError(f"--effective_batch_size {self.effective_batch_size} is not a multiple of per-device "
                            f"batch {self.per_device_train_batch_size} x {self.world_size} process(es)")
        self.gradient_accumulation_steps = self.effective_batch_size // per_step


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, DistillationArguments,
                               SparseTrainingArguments))
    try:
        if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            return parse_json_config(parser, sys.argv[1])
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags, values TrainingArguments refuses
        raise UserError(f"{first_line(error)} (see --help)") from None


def parse_json_config(parser: HfArgumentParser, path: str):
    """``finetune.py args.json``, as run_clm.py takes it. The parser takes the values as they are, unconverted:
    a number given as a string would fail later, in a comparison, as a traceback."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object of flags and values")
    for dataclass_type in parser.dataclass_types:
        for flag in dataclasses.fields(dataclass_type):
            if flag.name in config:
                check_json_type(flag, config[flag.name], path)
    try:
        return parser.parse_dict(config)
    except TypeError as error:  # a required flag missing
        raise UserError(f"{path}: {error}") from None


JSON_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def check_json_type(flag: dataclasses.Field, value, path: str) -> None:
    """Refuse a value whose JSON type is not the flag's: ``"5e-5"`` for a float, ``1`` for a bool."""
    is_union = typing.get_origin(flag.type) in (typing.Union, types.UnionType)
    kinds = [kind for kind in (typing.get_args(flag.type) if is_union else (flag.type,)) if kind is not type(None)]
    expected = kinds[0] if len(kinds) == 1 else None
    if expected not in JSON_TYPES or value is None:
        return
    if not isinstance(value, JSON_TYPES[expected]) or isinstance(value, bool) and expected is not bool:
        raise UserError(f"{path}: {flag.name} must be a JSON {expected.__name__}, got {json.dumps(value)}")
