"""``SparseTrainingMixin``: any ``transformers.Trainer`` in which pruned weights stay exactly zero.

Mixed in before the Trainer class (``class SparseSFTTrainer(SparseTrainingMixin, SFTTrainer)``);
``SparseTrainer`` is the mixin on the plain ``Trainer``, and ``SparseLoraTrainer`` (``finetune.py
--lora``) the same for a sparse-LoRA model, saving the merged model at the end. The masks are
captured once per model: the one the trainer is given, or each one ``model_init`` builds
(``train()`` and every ``hyperparameter_search`` trial build a fresh one). On every real optimizer
step (not on gradient-accumulation micro-steps) the gradients of pruned weights are zeroed before
clipping and the step, so the optimizer's moments for them stay zero, and the weights are re-masked
right after the step. The mask is never re-derived from ``W == 0`` during training: a kept weight
that passes through zero stays trainable. LoRA adapters, in the model given or added by the trainer
from a ``peft_config`` (TRL's trainers), are sparse LoRA (``dense_ft.sparse_lora``): their update,
and so their merge, never reaches a pruned block; any other adapter on a pruned weight is refused.
The run is guarded as well (``GuardedTrainingMixin``): divergence stops it, checkpoints are complete
or absent.
"""

import os
import warnings

import torch
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from transformers.training_args import OptimizerNames, ParallelMode

from .errors import UserError
from .guarded_trainer import GuardedTrainingMixin
from .masks import SparsityMasks
from .modeling import save_model
from .sparse_lora import attach_masks, has_sparse_lora, sparse_lora_config
from .sparsity import check_sparsity

__all__ = ["SparseLoraTrainer", "SparseTrainer", "SparseTrainingMixin", "check_sparsity"]


def check_steps_after_backward(optim: str) -> None:
    """Layer-wise optimizers (GaLore's, APOLLO's) and LOMO step each weight inside backward, on its gradient
    unmasked: the pruned gradients would enter the optimizer's state and, through GaLore's projection, the
    kept weights' updates."""
    name = OptimizerNames(optim).value
    if name.endswith("_layerwise") or name in (OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value):
        raise UserError(f"--optim {name} steps each weight inside backward, before the masks can act on its "
                        "gradient: choose an optimizer that steps after backward (adamw_torch, adamw_8bit, "
                        "adafactor, galore_adamw, ...)")


class _ReapplyMasksAfterStep(TrainerCallback):
    def __init__(self, trainer: "SparseTrainingMixin"):
        self.trainer = trainer  # its masks, not these: each model from model_init has its own

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.masks.apply_to_weights(trainable_only=True)


class SparseTrainingMixin(GuardedTrainingMixin):
    """Keeps a ``transformers.Trainer`` subclass's pruned weights at zero: list it first among the bases."""

    def __init__(self, *args, **kwargs):
        if isinstance(kwargs.get("peft_config"), LoraConfig):  # TRL's trainers add the adapters it describes
            kwargs["peft_config"] = sparse_lora_config(kwargs["peft_config"])
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise UserError("DeepSpeed is not supported: its engine steps inside backward, before the masks "
                            "can act; use DDP or FSDP2 (--fsdp)")
        check_steps_after_backward(self.args.optim)
        if self.args.fp16 and any(p.dtype == torch.float16 and p.requires_grad for p in self.model.parameters()):
            raise UserError("--fp16 needs float32 weights (loss scaling cannot unscale float16 gradients): "
                            "load the model in float32, or train with --bf16")
        if self.model_init is None:  # else call_model_init has captured them
            self._capture_masks(self.model)
        self.add_callback(_ReapplyMasksAfterStep(self))

    def call_model_init(self, trial=None):
        # train() builds a fresh model from model_init (once per hyperparameter_search trial): masks for each.
        model = super().call_model_init(trial)
        self._capture_masks(model)
        return model

    def _capture_masks(self, model) -> None:
        self.masks = SparsityMasks(model)
        attach_masks(model, self.masks)

    def _check_replicas_synchronize(self, model) -> None:
        """Several processes without DDP, FSDP or a model sharded at load would train apart, silently."""
        if (self.args.parallel_mode == ParallelMode.DISTRIBUTED and not self.is_fsdp_enabled
                and not self.is_distributed_loading_by_transformers
                and not isinstance(model, torch.nn.parallel.DistributedDataParallel)):
            raise RuntimeError("the model is not wrapped in DistributedDataParallel: the processes would not "
                               "synchronize gradients (did something call trainer.evaluate() before train()?)")

    def create_optimizer(self, model=None):
        # With FSDP2 the optimizer is made after sharding: from here on each rank masks its own rows.
        self.masks.match_local_shards()
        return super().create_optimizer(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero() and has_sparse_lora(self.model):
            warnings.warn(f"{output_dir or self.args.output_dir} holds a sparse-LoRA adapter: load it with "
                          "dense_ft.sparse_lora.load_sparse_lora, or merge it with python -m dense_ft.merge_lora. "
                          "PEFT's own loaders (PeftModel, AutoPeftModelForCausalLM, AutoModelForCausalLM) add its "
                          "update unmasked, on the pruned blocks too", stacklevel=2)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._check_replicas_synchronize(model)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.masks.apply_to_grads()
        return loss


class SparseTrainer(SparseTrainingMixin, Trainer):
    """``transformers.Trainer`` with the pruned pattern kept.

    Its evaluation loss is the plain cross-entropy, under ``label_smoothing_factor`` too (which then smooths the
    training loss only), so that ``exp(eval_loss)`` is the perplexity.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training or self.label_smoother is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class SparseLoraTrainer(SparseTrainer):
    """``SparseTrainer`` for a sparse-LoRA model that saves the adapter and the merged model at the end.

    The adapters' updates are masked in their layers; what the mixin's masks add is the ``modules_to_save``
    copies of pruned weights, trained whole: their pruned gradients and weights are zeroed at every step.

    No bare adapter is ever written to the top of the output directory (or pushed to the top of its Hub
    repository): there ``from_pretrained`` would load it, over the merged model, as a plain LoRA on the pruned
    model, dense on the pruned blocks.
    """

    def save_merged_model(self) -> None:
        """The adapter in ``output_dir/adapter``; the merged model (masked update added) in ``output_dir``.

        Nothing is pushed to the Hub here: the output directory is pushed once it is whole.
        """
        output_dir = self.args.output_dir
        self.save_model(_internal_call=True)
        merged = self.accelerator.unwrap_model(self.model).merge_and_unload()
        if self.is_world_process_zero():
            save_model(merged, self.processing_class, output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A save to the output directory (``save_model()``, ``push_to_hub()``) puts the adapter in its ``adapter/``."""
        if output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir):
            output_dir = os.path.join(self.args.output_dir, "adapter")
        super().save_model(output_dir, _internal_call)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No push at a checkpoint: the Trainer's copies the checkpoint's adapter to the top of the output directory
        and uploads it; the merged model is pushed at the end."""
