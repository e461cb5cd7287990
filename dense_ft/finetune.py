"""Sparse fine-tuning of a pruned causal LM: pruned weights stay zero.

    python dense_ft/finetune.py --model_name_or_path out/.../pruned_model \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --output_dir out/.../dense_finetuned_model --num_train_epochs 3 --learning_rate 5e-5

By default every weight trains (``SparseTrainer``). With ``--lora`` only sparse LoRA adapters
train (``dense_ft.sparse_lora``): their update is masked by the pruned blocks, checkpoints hold
the adapter (PEFT format), and the output directory gets the merged model (still sparse) with
the final adapter in ``adapter/``. With ``--teacher_model`` (the dense original) either learns
from the teacher as well (``dense_ft.distillation``). Every ``transformers.TrainingArguments``
flag works; ``--push_to_hub`` pushes the output directory once it is whole (``dense_ft.hub``).

A rerun with the same ``--output_dir`` resumes from its newest complete checkpoint, when that
checkpoint belongs to the same run (``--overwrite_output_dir`` starts over); Ctrl+C or SIGTERM
saves a checkpoint at the end of the current step and exits with status 130. One run at a
time writes to an output directory. A non-finite loss stops the run with status 2 and saves
nothing as final.
"""

import json
import math
import os
import signal
import sys
from contextlib import nullcontext
from itertools import chain

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from peft import get_peft_model
from transformers import (
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from dense_ft.arguments import DataArguments, LoraArguments, ModelArguments, SparseTrainingArguments, parse_args
from dense_ft.checkpoints import (
    check_belongs_to_run,
    check_free_space,
    check_holds_training_state,
    check_resumable,
    checkpoint_bytes,
    full_disk_error,
    latest_complete_checkpoint,
    weights_fingerprint,
)
from dense_ft.distillation import (
    DistillationArguments,
    DistillingSparseLoraTrainer,
    DistillingSparseTrainer,
    load_teacher,
)
from dense_ft.errors import SAVE_ERRORS, UserError, exit_on_user_error, first_line, out_of_memory_as_user_error
from dense_ft.hub import create_hub_repo, push_output_dir
from dense_ft.interrupt import StopOnSignal
from dense_ft.masks import DEFAULT_BLOCK_SIZE, BlockMask, SparsityMasks
from dense_ft.merge_lora import merge
from dense_ft.model_card import write_model_card
from dense_ft.modeling import check_vocabulary, load_model
from dense_ft.output_dir import check_not_an_input, locked_output_dir
from dense_ft.sparse_lora import lora_config, sparse_lora_config
from dense_ft.sparse_trainer import SparseLoraTrainer, SparseTrainer, check_sparsity, check_steps_after_backward
from dense_ft.sparsity import PATTERN_KEY, is_4bit
from dense_ft.text import (
    hold_out_validation,
    load_corpus,
    load_text_files,
    load_wikitext_dir,
    map_options,
    stream_errors_as_user_error,
)
from dense_ft.versions import check_installed_versions, check_optimizer_steps_on

INTERRUPTED_EXIT_CODE = 130


class PrintProgress(TrainerCallback):
    """``Step 10: loss=2.5432`` lines, as the guide shows them, and each evaluation's perplexity."""

    TERMS = ("ce_loss", "kl_loss", "squarehead_loss")  # with a teacher: what the loss is made of

    def __init__(self):
        self.best_step_loaded = None

    def on_train_begin(self, args, state, control, **kwargs):
        """--auto_find_batch_size lowers the per-device batch after an out-of-memory error and begins again; the
        accumulation stays, so the effective batch size printed at the start is no longer the one trained with."""
        per_device = state.train_batch_size // max(1, args.n_gpu)  # the Trainer's batch spans a process's GPUs
        if state.is_world_process_zero and per_device != args.per_device_train_batch_size:
            print(f"--auto_find_batch_size lowered the per-device batch to {per_device} after running out of memory: "
                  f"effective batch size {effective_batch(args, per_device)}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            terms = ", ".join(f"{name.removesuffix('_loss')}={logs[name]:.4f}" for name in self.TERMS if name in logs)
            print(f"Step {state.global_step}: loss={logs['loss']:.4f}" + (f" ({terms})" if terms else ""), flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.best_step_loaded = best_step_loaded(args, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            print(f"Evaluation {evaluated_step(state.global_step, self.best_step_loaded)}: "
                  f"loss={metrics['eval_loss']:.4f}, perplexity={perplexity(metrics['eval_loss']):.2f}", flush=True)


def best_step_loaded(args: TrainingArguments, state: TrainerState) -> int | None:
    """The step of the checkpoint the Trainer loads when training ends (--load_best_model_at_end), if it does."""
    return state.best_global_step if args.load_best_model_at_end and state.best_model_checkpoint else None


def evaluated_step(step: int, best_step: int | None) -> str:
    """Which weights an evaluation logged at ``step`` measured: after training, the best checkpoint's if loaded."""
    return f"at step {step}" if best_step is None else f"of the best checkpoint (step {best_step})"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700))


def effective_batch(args: TrainingArguments, per_device: int) -> str:
    """The sequences per optimizer step with ``per_device`` per process, and what makes them."""
    world, accumulation = args.world_size, args.gradient_accumulation_steps
    return (f"{per_device * world * accumulation} (per-device {per_device} x {world} process(es) x accumulation "
            f"{accumulation})")


def load_raw_text(data_args: DataArguments, **load_kwargs) -> tuple[DatasetDict | IterableDatasetDict, bool]:
    """The text by split (``load_kwargs`` go to ``load_dataset``), and whether its validation split was held out of
    its training rows (run_clm.py's way for a source without one)."""
    raw = load_source_text(data_args, **load_kwargs)
    if "validation" in raw or data_args.validation_split_percentage == 0:
        return raw, False
    return hold_out_validation(raw, data_args.validation_split_percentage), True


def load_source_text(data_args: DataArguments, **load_kwargs):
    load_kwargs["streaming"] = data_args.streaming
    if data_args.dataset_dir:
        return load_wikitext_dir(data_args.dataset_dir, splits=("train", "validation"),
                                 keep_linebreaks=data_args.keep_linebreaks, **load_kwargs)
    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        return load_text_files(files, keep_linebreaks=data_args.keep_linebreaks, **load_kwargs)
    if data_args.dataset_name:
        return load_corpus(data_args.dataset_name, data_args.dataset_config_name, splits=("train",), **load_kwargs)
    raise UserError("no training data: give --dataset_name, --dataset_dir or --train_file")


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate tokenized lines and cut them into ``block_size`` chunks (run_clm's grouping)."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = len(concatenated["input_ids"]) // block_size * block_size
    blocks = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
    blocks["labels"] = blocks["input_ids"].copy()
    return blocks


def prepare_datasets(raw, tokenizer, data_args: DataArguments, training_args):
    """The training and validation sequences of ``block_size`` tokens: computed once and cached, or, from a stream,
    as the Trainer reads them."""
    cached = {"num_proc": data_args.preprocessing_num_workers, "load_from_cache_file": not data_args.overwrite_cache}
    with training_args.main_process_first(desc="tokenizing and grouping"):
        tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"],
                            **map_options(raw, **cached, desc="Tokenizing"))
        grouped = tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": data_args.block_size},
                                **map_options(raw, **cached, desc=f"Grouping into blocks of {data_args.block_size}"))
    train = grouped["train"]
    if is_empty(train):
        raise UserError(f"no training sequence of {data_args.block_size} tokens: the training text is too short")
    if data_args.max_train_samples is not None:
        train = first_rows(train, data_args.max_train_samples)
    evaluation = grouped.get("validation")
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = first_rows(evaluation, data_args.max_eval_samples)
    if evaluation is not None and is_empty(evaluation):
        evaluation = None
    if evaluation is None and training_args.eval_strategy != "no":
        raise UserError(f"--eval_strategy {training_args.eval_strategy.value} needs validation text of "
                        f"{data_args.block_size} tokens or more (--validation_file, or the validation split of "
                        "--dataset_dir or --dataset_name): give one, or --eval_strategy no")
    return train, evaluation


def is_empty(sequences: Dataset | IterableDataset) -> bool:
    """Whether there is no sequence; a stream is read up to its first one."""
    return len(sequences) == 0 if isinstance(sequences, Dataset) else next(iter(sequences), None) is None


def first_rows(sequences: Dataset | IterableDataset, count: int) -> Dataset | IterableDataset:
    if isinstance(sequences, IterableDataset):
        return sequences.take(count)
    return sequences.select(range(min(len(sequences), count)))


def checkpoint_to_resume(training_args: SparseTrainingArguments) -> str | None:
    """The newest complete checkpoint in the output directory; refuses to overwrite a finished model unless asked.

    Incomplete checkpoints (a save cut short) are moved aside, by the main process, and named.
    """
    if training_args.resume_from_checkpoint or training_args.overwrite_output_dir:
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if not os.path.isdir(output_dir):
        return None
    main_process = training_args.process_index == 0
    last, incomplete = latest_complete_checkpoint(output_dir, move_incomplete=main_process)
    if incomplete and main_process:
        print(f"Skipping {len(incomplete)} incomplete checkpoint(s), moved aside as incomplete-*: "
              f"{', '.join(os.path.basename(path) for path in incomplete)}", flush=True)
    if last is None and any(name.endswith(".safetensors") for name in os.listdir(output_dir)):
        raise UserError(f"{output_dir} already holds a trained model and no checkpoint to resume; "
                        "pass --overwrite_output_dir to train again")
    return last


def run_identity(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                 distill_args: DistillationArguments, training_args: SparseTrainingArguments, model,
                 held_out: bool) -> dict:
    """What defines a run: a checkpoint resumes only into a run with the same values.

    The run's length (epochs, max steps) is not part of it: a resume may extend a run, as with the Trainer.
    The share of the training rows ``held_out`` for validation is, when there is one.
    """
    args = training_args
    lora = {"r": lora_args.lora_r, "alpha": lora_args.lora_alpha, "dropout": lora_args.lora_dropout,
            "target_modules": sorted(lora_args.lora_target_modules)} if lora_args.lora else None
    distillation = {"teacher": _source(distill_args.teacher_model), "loss": distill_args.distill_loss,
                    "temperature": distill_args.distill_temperature,
                    "weight": distill_args.distill_weight} if distill_args.teacher_model else None
    if distillation and distill_args.init_kwargs():  # (only when given: older checkpoints still resume)
        distillation["init_kwargs"] = distill_args.init_kwargs()
    identity = {"model": _source(model_args.model_name_or_path), "weights": weights_fingerprint(model),
                "data": _source(data_args.dataset_dir or data_args.train_file
                                or f"{data_args.dataset_name}:{data_args.dataset_config_name}"),
                "block_size": data_args.block_size, "max_train_samples": data_args.max_train_samples,
                "torch_dtype": model_args.torch_dtype, "lora": lora, "distillation": distillation, "seed": args.seed,
                "learning_rate": args.learning_rate, "lr_scheduler_type": args.lr_scheduler_type.value,
                "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "optim": args.optim.value,
                "effective_batch_size": args.per_device_train_batch_size * args.world_size
                * args.gradient_accumulation_steps}
    if held_out:  # a key of its own, absent otherwise: the checkpoints of runs before it still resume
        identity["validation_split_percentage"] = data_args.validation_split_percentage
    if model_args.load_in_4bit:  # likewise
        identity["base_weights"] = model_args.describe_4bit()
    if data_args.streaming:  # likewise: a stream comes in its own order, unshuffled
        identity["streaming"] = True
    if not data_args.keep_linebreaks:  # likewise
        identity["keep_linebreaks"] = False
    if model_args.tokenizer_name:  # likewise
        identity["tokenizer"] = _source(model_args.tokenizer_name)
    return identity


def _source(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else path



def print_start(trainer: SparseTrainer | SparseLoraTrainer, resume_from: str | None,
                model_args: ModelArguments) -> None:
    initial_sparsity = check_sparsity(trainer.model)
    if not trainer.is_world_process_zero():
        return
    print(f"*** Starting sparse {'LoRA' if isinstance(trainer, SparseLoraTrainer) else 'full'} fine-tuning ***")
    if model_args.load_in_4bit:
        print(f"Base weights: {model_args.describe_4bit()} (QLoRA); the adapter is merged into the unquantized "
              "model at the end")
        print(f"Initial model sparsity: {initial_sparsity:.4f} in 4-bit, whose codes make zeros of small weights too; "
              f"pruned: {trainer.masks.num_pruned / trainer.masks.num_weights:.4f}")
    else:
        print(f"Initial model sparsity: {initial_sparsity:.4f}")
    describe_masks(trainer.masks)
    trainable = sum(parameter_count(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in trainer.model.parameters())
    print(f"Trainable params: {trainable:,} || All params: {total:,} || Trainable%: {100 * trainable / total:.2f}")
    print(f"Effective batch size: {effective_batch(trainer.args, trainer.args.per_device_train_batch_size)}")
    if getattr(trainer, "teacher", None) is not None:
        settings = trainer.distillation
        loaded_with = f"; teacher loaded with {json.dumps(kwargs)}" if (kwargs := settings.init_kwargs()) else ""
        print(f"Distilling from {settings.teacher_model}: loss {settings.distill_loss}, temperature "
              f"{settings.distill_temperature:g}, weight {settings.distill_weight:g}{loaded_with}")
    if resume_from:
        print(f"Resuming from checkpoint {resume_from}")


def parameter_count(parameter) -> int:
    return parameter.quant_state.shape.numel() if is_4bit(parameter) else parameter.numel()


def describe_masks(masks: SparsityMasks) -> None:
    """Say which zeros are kept when the model's config does not (no ``sparsity_pattern``)."""
    if masks.source == "zeros":
        blocks = sum(isinstance(mask, BlockMask) for mask in masks.masks.values())
        kind = f"{DEFAULT_BLOCK_SIZE}x{DEFAULT_BLOCK_SIZE} pruned blocks" if blocks else "unstructured pruning"
        print(f"No {PATTERN_KEY} in the model's config: {kind} detected from its zeros in {len(masks)} weights; "
              "those stay zero")
    elif masks.source == "none":
        stray = (f" (its {masks.stray_zeros:,} zero weights are scattered, not pruned: they train)"
                 if masks.stray_zeros else "")
        print(f"Warning: the model is not pruned{stray} and has no {PATTERN_KEY}: training it as a dense model. "
              "Fine-tune the pruned model (main_block.py --save_model) to keep a sparsity.")


def save_initial_evaluation(trainer: Trainer) -> None:
    """The evaluation before the first step (``eval_on_start``) as ``initial_eval_results.json``."""
    for record in trainer.state.log_history:
        if "eval_loss" in record and record["step"] == 0:
            metrics = {"initial_eval_loss": record["eval_loss"], "perplexity": perplexity(record["eval_loss"])}
            trainer.save_metrics("initial_eval", metrics, combined=False)
            return


def final_evaluation(trainer: Trainer) -> dict:
    """The final model's evaluation: the loop's own when it evaluated at the last step (the same model, the
    same data), else a new one. With load_best_model_at_end the final model may be another step's."""
    last = next((record for record in reversed(trainer.state.log_history) if "eval_loss" in record), None)
    if last is not None and last["step"] == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()


def check_optimizer(training_args: SparseTrainingArguments, model) -> None:
    """Refuse, before training, an --optim / --optim_args the Trainer cannot build (a missing package, say) or
    that cannot step on this device."""
    check_steps_after_backward(training_args.optim)
    try:
        optimizer_cls, _ = SparseTrainer.get_optimizer_cls_and_kwargs(training_args, model)
    except (ImportError, ValueError) as error:
        raise UserError(f"--optim {training_args.optim.value}: {error}") from None
    check_optimizer_steps_on(training_args.device.type, optimizer_cls, training_args.optim.value)


def build_trainer(model, lora_args: LoraArguments, teacher=None, distillation: DistillationArguments | None = None,
                  **kwargs) -> SparseTrainer | SparseLoraTrainer:
    if teacher is not None:
        kwargs.update(teacher=teacher, distillation=distillation)
    if not lora_args.lora:
        return (SparseTrainer if teacher is None else DistillingSparseTrainer)(model=model, **kwargs)
    config = lora_config(lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target_modules)
    try:  # sparse-LoRA layers without masks yet: the trainer captures the masks and gives each layer its own
        model = get_peft_model(model, sparse_lora_config(config))
    except ValueError as error:  # PEFT's word for target modules that match nothing
        raise UserError(f"--lora_target_modules: {first_line(error)}") from None
    return (SparseLoraTrainer if teacher is None else DistillingSparseLoraTrainer)(model=model, **kwargs)


def run(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
        distill_args: DistillationArguments, training_args: SparseTrainingArguments) -> int:
    model_args.validate(lora_args)
    lora_args.validate(training_args)
    data_args.validate(training_args)
    distill_args.validate(model_args.model_name_or_path)
    training_args.validate()
    training_args.apply_effective_batch_size()
    inputs = {"--model_name_or_path": model_args.model_name_or_path, "--teacher_model": distill_args.teacher_model}
    check_not_an_input(training_args.output_dir, "--output_dir", inputs)
    if training_args.push_to_hub and training_args.process_index == 0:
        create_hub_repo(training_args)
    with (locked_output_dir(training_args.output_dir) if training_args.process_index == 0 else nullcontext(),
          stream_errors_as_user_error(data_args.describe_source()) if data_args.streaming else nullcontext(),
          out_of_memory_as_user_error(lambda: memory_remedies(model_args, lora_args, distill_args, training_args))):
        return train_and_save(model_args, data_args, lora_args, distill_args, training_args)


def memory_remedies(model_args: ModelArguments, lora_args: LoraArguments, distill_args: DistillationArguments,
                    training_args: SparseTrainingArguments) -> list[str]:
    """What takes less memory than this run, the largest saving last."""
    remedies = ["lower --per_device_train_batch_size, keeping the batch with --effective_batch_size (the run then "
                "resumes from its last checkpoint)"]
    if not (training_args.activation_checkpointing or training_args.gradient_checkpointing):
        remedies.append("add --activation_checkpointing true")
    if distill_args.teacher_model and "quantization_config" not in distill_args.init_kwargs():
        remedies.append("load the teacher in 4-bit (--teacher_model_init_kwargs with a quantization_config)")
    if not lora_args.lora:
        remedies.append("train sparse LoRA (--lora)")
    elif not model_args.load_in_4bit:
        remedies.append("load the pruned model in 4-bit (--load_in_4bit)")
    return remedies


def train_and_save(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                   distill_args: DistillationArguments, training_args: SparseTrainingArguments) -> int:
    resume_from = checkpoint_to_resume(training_args)
    raw, held_out = load_raw_text(data_args, **model_args.hub_kwargs())
    model, tokenizer = load_model(model_args.model_name_or_path, model_args.torch_dtype,
                                  tokenizer_name=model_args.tokenizer_name,
                                  **model_args.loading_kwargs(training_args.device))
    identity = run_identity(model_args, data_args, lora_args, distill_args, training_args, model, held_out)
    if training_args.resume_from_checkpoint:
        check_resumable(resume_from, identity)
    elif resume_from:
        check_belongs_to_run(resume_from, identity)
    if resume_from:
        check_holds_training_state(resume_from)
    check_optimizer(training_args, model)
    check_vocabulary(model, tokenizer, model_args.tokenizer_name or model_args.model_name_or_path)
    if data_args.block_size > model.config.max_position_embeddings:
        raise UserError(f"--block_size {data_args.block_size} exceeds the model's "
                        f"{model.config.max_position_embeddings} positions")
    train_dataset, eval_dataset = prepare_datasets(raw, tokenizer, data_args, training_args)

    teacher = (load_teacher(distill_args, model, tokenizer, training_args, **model_args.hub_kwargs(),
                            trust_remote_code=model_args.trust_remote_code)
               if distill_args.teacher_model else None)

    set_seed(training_args.seed)  # the adapters' initialization, as run_clm seeds the model's
    stop_on_signal = StopOnSignal()
    trainer = build_trainer(
        model, lora_args, teacher, distill_args, args=training_args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=tokenizer, data_collator=default_data_collator,
        callbacks=[PrintProgress(), stop_on_signal],
        nonfinite_patience=training_args.nonfinite_patience, run_identity=identity,
    )
    print_start(trainer, resume_from, model_args)
    if trainer.is_world_process_zero() and training_args.save_strategy != "no":
        space_warning = check_free_space(training_args.output_dir, checkpoint_bytes(
            trainer.model, training_args.optim.value, lora_args.lora, training_args.save_only_model))
        if space_warning:
            print(space_warning, flush=True)

    # Evaluated inside the training loop: a trainer.evaluate() before train() leaves the model
    # unwrapped by DDP (transformers 5.24), and the ranks would then never synchronize gradients.
    training_args.eval_on_start = eval_dataset is not None and not resume_from
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stop_on_signal.requested:
            if trainer.is_world_process_zero():
                checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{trainer.state.global_step}")
                print(f"Training interrupted at step {trainer.state.global_step}: checkpoint saved to {checkpoint}. "
                      "Run the same command again to resume.", flush=True)
            return INTERRUPTED_EXIT_CODE
        violations, final_sparsity = save_and_report(trainer, result.metrics, model_args)
        if trainer.is_world_process_zero():
            write_finetuned_card(trainer, model_args, data_args, lora_args, distill_args, violations, final_sparsity)
            if training_args.push_to_hub and violations:
                print("Not pushed to the Hub: pruned weights are non-zero", flush=True)
            elif training_args.push_to_hub:
                print(f"Model pushed to the Hub: {push_output_dir(trainer)}", flush=True)
        return 1 if violations else 0
    finally:  # the process group destroyed before exit: without it a rank may abort there ("terminate called")
        close_progress_bars(trainer)
        stop_on_signal.restore_handlers()  # for a caller of main() in its own process, as the tests are
        trainer.end()


def close_progress_bars(trainer: Trainer) -> None:
    """Close the bars a failed run leaves open (a finished one has closed them): its one-line error then starts a
    line of its own, and no stale bar is drawn below it at exit."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for bar in (callback.prediction_bar, callback.training_bar):
                if bar is not None:
                    bar.close()


def write_finetuned_card(trainer, model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                         distill_args: DistillationArguments, violations: int, final_sparsity: float) -> None:
    args = trainer.args
    data = (data_args.dataset_dir or data_args.train_file
            or f"{data_args.dataset_name} ({data_args.dataset_config_name})")
    recipe = {"method": "sparse LoRA (update masked by the pruned blocks, merged)" if lora_args.lora else
              "sparse full fine-tuning (SparseTrainer)",
              "learning rate": args.learning_rate, "epochs": args.num_train_epochs, "max steps": args.max_steps,
              "optimizer steps run": trainer.state.global_step, "tokens per sequence": data_args.block_size,
              "effective batch": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
              "optimizer": args.optim.value, "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
              "weights": model_args.torch_dtype}
    if model_args.load_in_4bit:
        recipe["weights"] = (f"{model_args.describe_4bit()} in training, evaluated so; merged into the model in "
                             f"{model_args.torch_dtype}")
    if lora_args.lora:
        recipe.update({"LoRA rank": lora_args.lora_r, "LoRA alpha": lora_args.lora_alpha,
                       "LoRA dropout": lora_args.lora_dropout, "LoRA modules": lora_args.lora_target_modules})
    if distill_args.teacher_model:
        recipe.update({"teacher": distill_args.teacher_model, "distillation loss": distill_args.distill_loss,
                       "distillation temperature": distill_args.distill_temperature,
                       "distillation weight": distill_args.distill_weight})
        if distill_args.init_kwargs():
            recipe["teacher loaded with"] = json.dumps(distill_args.init_kwargs())
    results = first_and_final_perplexity(trainer)
    sparsity = {"sparsity of the prunable weights": final_sparsity,
                "pruned weights that are non-zero": violations}
    write_model_card(args.output_dir, f"Sparse fine-tuning of {os.path.basename(model_args.model_name_or_path)}",
                     model_args.model_name_or_path, trainer.model.config, f"Training text: {data}.", recipe, results,
                     sparsity)


def first_and_final_perplexity(trainer: Trainer) -> dict[str, float]:
    """The first validation perplexity logged and the saved model's, each named by the weights it measured."""
    evaluations = [record for record in trainer.state.log_history if "eval_loss" in record]
    if not evaluations:
        return {}
    first, final = evaluations[0], evaluations[-1]
    final_step = evaluated_step(final["step"], best_step_loaded(trainer.args, trainer.state))
    return {f"validation perplexity at step {first['step']}": perplexity(first["eval_loss"]),
            f"validation perplexity {final_step}": perplexity(final["eval_loss"])}


def save_final_model(trainer: SparseTrainer | SparseLoraTrainer, model_args: ModelArguments) -> dict | None:
    """Save the final model; a 4-bit run's merge report, on the main process."""
    output_dir = trainer.args.output_dir
    try:
        if model_args.load_in_4bit:
            return merge_into_unquantized(trainer, model_args)
        if isinstance(trainer, SparseLoraTrainer):
            trainer.save_merged_model()
        else:
            trainer.save_model(_internal_call=True)  # no push yet: the card and metrics are not written
    except SAVE_ERRORS as error:
        kept, _ = latest_complete_checkpoint(output_dir, move_incomplete=False)
        full = full_disk_error(error, output_dir, f"the final model to {output_dir}",
                               f"{kept} is kept; free some space and run the same command again to resume from it "
                               "and save the model" if kept else "free some space and train again")
        if full is None:
            raise
        raise full from error
    return None


def merge_into_unquantized(trainer: SparseLoraTrainer, model_args: ModelArguments) -> dict | None:
    """QLoRA's end: the adapter saved, then merged by the main process into the pruned model loaded unquantized on
    the CPU (a merge into 4-bit weights would requantize them); the merge's report there, else None."""
    trainer.save_model(_internal_call=True)  # to output_dir/adapter
    report = None
    if trainer.is_world_process_zero():
        output_dir = trainer.args.output_dir
        report = merge(model_args.model_name_or_path, os.path.join(output_dir, "adapter"), output_dir,
                       model_args.torch_dtype, tokenizer_name=model_args.tokenizer_name, **model_args.source_kwargs())
    trainer.accelerator.wait_for_everyone()
    return report


def save_and_report(trainer: SparseTrainer | SparseLoraTrainer, train_metrics: dict,
                    model_args: ModelArguments) -> tuple[int, float]:
    """Save the model, state and metrics; print the final sparsity and evaluation; the saved model's pruned weights
    that are non-zero, and its sparsity."""
    if trainer.is_fsdp_enabled:  # the final save is a normal HF directory, whatever the checkpoints are
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    merged = save_final_model(trainer, model_args)
    trainer.save_state()
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    if merged is not None:  # the model saved is not the one trained: its unquantized merge
        violations, final_sparsity = merged["violations"], merged["sparsity"]
    else:
        violations, final_sparsity = sum(trainer.masks.violations().values()), check_sparsity(trainer.model)
    if trainer.is_world_process_zero():
        print(f"Final model sparsity: {final_sparsity:.4f}")
        print("Sparsity maintained: " + ("yes (every pruned weight is still zero)" if not violations else
                                         f"NO ({violations} pruned weights are non-zero)"))
    if trainer.eval_dataset is not None:
        save_initial_evaluation(trainer)
        metrics = final_evaluation(trainer)
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics, combined=False)
        if model_args.load_in_4bit and trainer.is_world_process_zero():
            print(f"Evaluated: the model as trained ({model_args.describe_4bit()}, with the adapter). The merged "
                  f"model saved is unquantized: main_block.py --model {trainer.args.output_dir} evaluates it")
    if trainer.is_world_process_zero():
        print(f"Model saved to {trainer.args.output_dir}")
    return violations, final_sparsity


def main(argv=None) -> None:
    # A process a script starts with `&` ignores SIGINT: take it back, for the scripts that pass Ctrl+C on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with exit_on_user_error():
        check_installed_versions()  # before parsing: an old transformers would not know some flags
        model_args, data_args, lora_args, distill_args, training_args = parse_args(argv)
        try:
            sys.exit(run(model_args, data_args, lora_args, distill_args, training_args))
        except KeyboardInterrupt:
            print("Aborted.", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
