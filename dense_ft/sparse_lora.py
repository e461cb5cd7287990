"""Sparse LoRA: PEFT LoRA adapters whose update never reaches a pruned block.

Each adapted weight computes with ``W + s * (M * (B @ A))``, where ``M`` is 0 on the pruned
blocks (the masks full fine-tuning uses), so training, evaluation and the merged model compute
the same function and the merge writes zeros where the model was pruned. The adapters are
plain PEFT LoRA (``adapter_config.json``, ``adapter_model.safetensors``): the mask comes from
the pruned model, not from the adapter.

In training, a block mask's update is computed beside the base layer by blocks of the rank-r
factors (``BlockMaskedLoraFunction``): no (out, in) tensor is formed, forward or backward, and
backward skips the weight gradient ``g.T @ x``, so a step costs about what plain LoRA's does (at
high ranks, from 86 with 16x16 blocks, the block grid's products cost more than that gradient,
and training folds the update as evaluation does). In evaluation, and for an element mask
(unstructured pruning, which has no blocks to factor), the masked update is folded into the
weight for one matmul per layer (``MaskedLoraFunction``, which keeps only ``x``, ``A`` and ``B``
for backward): the evaluation computes with exactly the weights the merge writes, bf16 rounding
included. A 4-bit base (QLoRA) keeps its own kernel, its update computed beside it, and its
adapter merges into the unquantized pruned model (``python -m dense_ft.merge_lora``).
"""

import dataclasses
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict, load_peft_weights
from torch import nn
from torch.nn import functional as F

from .errors import UserError, first_line
from .masks import BlockMask, Mask, SparsityMasks
from .modeling import looks_like_local_path
from .sparsity import is_4bit, pin_standard_4bit_layout

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The initializations that leave the base weight as it is: PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA subtract the
# adapter's first update from it, which fills the pruned blocks; MiCA is a variant (its B stays frozen).
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")


def masked_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, pruned: Mask) -> torch.Tensor:
    """``s * (B @ A)`` with the pruned weights zeroed: a new (out, in) tensor."""
    delta = (lora_B @ lora_A).mul_(scaling)
    pruned.apply_(delta)
    return delta


def _effective_weight(weight, lora_A, lora_B, scaling, pruned, dtype) -> torch.Tensor:
    delta = masked_delta(lora_A, lora_B, scaling, pruned)
    return (delta if weight is None else torch.add(weight, delta)).to(dtype)


class MaskedLoraFunction(torch.autograd.Function):
    """``x @ (W + s * M * (B @ A)).T`` (``W`` may be None: the masked update alone).

    Saves ``x``, ``A``, ``B`` (and the frozen ``W``, which costs nothing), never the (out, in)
    effective weight: backward recomputes it for the input's gradient, and masks the weight
    gradient ``g.T @ x`` before it reaches ``A`` and ``B``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling, pruned):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # compute in the autocast dtype, as nn.Linear would
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            output = F.linear(x, _effective_weight(weight, lora_A, lora_B, scaling, pruned, x.dtype))
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling, ctx.pruned = scaling, pruned
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        scaling, pruned = ctx.scaling, ctx.pruned
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ _effective_weight(weight, lora_A, lora_B, scaling, pruned, grad_output.dtype)
        grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        pruned.apply_(grad_weight)
        grad_weight = grad_weight.to(lora_A.dtype).mul_(scaling)
        return grad_x, None, lora_B.T @ grad_weight, grad_weight @ lora_A.T, None, None


def _by_blocks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """The (n, k * b) ``matrix`` as its k block columns, (k, n, b): a view where the layout allows."""
    return matrix.reshape(matrix.shape[0], -1, block_size).transpose(0, 1)


def _kept_block_sums(x: torch.Tensor, lora_A: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``S[o] = sum_c kept[o, c] * x[:, c] @ A[:, c].T`` (block columns ``c``), as (out / b, tokens, r)."""
    block_size = x.shape[1] // kept.shape[1]
    products = torch.bmm(_by_blocks(x, block_size), _by_blocks(lora_A, block_size).mT)  # (in / b, tokens, r)
    return (kept @ products.reshape(kept.shape[1], -1)).view(kept.shape[0], x.shape[0], -1)


class BlockMaskedLoraFunction(torch.autograd.Function):
    """``s * x @ (M * (B @ A)).T`` for a block mask ``M``, ``x`` of shape (tokens, in), by blocks of ``A`` and ``B``.

    ``kept`` (out / b, in / b) is 1 where a block is kept. Row block ``o`` of the update is
    ``S[o] @ B[o].T`` (``_kept_block_sums``), and backward runs the same sums the other way, from the
    gradient's products with ``B``. No (out, in) tensor, no weight gradient ``g.T @ x``: the work beyond plain
    LoRA's is three matmuls of the block grid with rank-r tensors per step (one forward, two backward), each
    about ``r / b**2`` of the layer's own matmul (3% at rank 8). Saves ``x``, ``A``, ``B`` and ``kept``, and
    recomputes the sums.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, kept):
        ctx.save_for_backward(x, lora_A, lora_B, kept)
        ctx.scaling = scaling
        block_size = x.shape[1] // kept.shape[1]
        sums = _kept_block_sums(x, lora_A, kept).mul_(scaling)
        update = torch.bmm(sums, _by_blocks(lora_B.T, block_size))  # (out / b, tokens, b)
        return update.transpose(0, 1).reshape(x.shape[0], -1)

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_A, lora_B, kept = ctx.saved_tensors
        block_size = x.shape[1] // kept.shape[1]
        rank = lora_A.shape[0]
        grad_blocks = _by_blocks(grad_output, block_size)  # (out / b, tokens, b)
        grad_B = torch.bmm(grad_blocks.mT, _kept_block_sums(x, lora_A, kept)).reshape(-1, rank).mul_(ctx.scaling)
        grad_products = torch.bmm(grad_blocks, _by_blocks(lora_B.T, block_size).mT)  # (out / b, tokens, r)
        grad_sums = (kept.T @ grad_products.reshape(kept.shape[0], -1)).view(kept.shape[1], x.shape[0], rank)
        grad_sums.mul_(ctx.scaling)
        grad_A = torch.bmm(grad_sums.mT, _by_blocks(x, block_size)).transpose(0, 1).reshape(rank, -1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_sums, _by_blocks(lora_A, block_size)).transpose(0, 1).reshape(x.shape)
        return grad_x, grad_A, grad_B, None, None


def block_masked_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        pruned: BlockMask) -> torch.Tensor:
    """``s * x @ (M * (B @ A)).T`` for ``x`` of any leading shape, in the autocast dtype where autocast is on,
    else in the adapters' dtype (as PEFT computes its update)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else lora_A.dtype
    kept = pruned.kept_blocks(dtype)
    with torch.autocast(device_type, enabled=False):
        update = BlockMaskedLoraFunction.apply(x.reshape(-1, x.shape[-1]).to(dtype), lora_A.to(dtype),
                                               lora_B.to(dtype), scaling, kept)
    return update.view(*x.shape[:-1], -1)


class MaskedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose forward, merge and unmerge keep the pruned blocks of the base weight."""

    pruned: Mask | None = None

    def merge(self, *args, **kwargs) -> None:
        if is_4bit(self.get_base_layer().weight):
            raise UserError("a sparse-LoRA adapter on a 4-bit model merges into the pruned model unquantized "
                            "(4-bit weights would be requantized): save the adapter and run python -m "
                            "dense_ft.merge_lora PRUNED_MODEL ADAPTER OUTPUT_DIR")
        super().merge(*args, **kwargs)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        if self.pruned is not None:
            self.pruned.apply_(delta)
        return delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise UserError("sparse LoRA does not support mixed adapter batches (adapter_names)")
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or not adapters or self.pruned is None:
            return super().forward(x, *args, **kwargs)  # (no pruned weight here: plain LoRA)
        base = self.get_base_layer()
        self.pruned.to(base.weight.device)  # captured before the Trainer moved the model; a no-op after
        if isinstance(self.pruned, BlockMask) and (self.training or is_4bit(base.weight)) \
                and not self._folding_costs_less(base, adapters):
            return self._forward_by_blocks(x, base, adapters)
        return self._forward_folded(x, base, adapters)

    def _folding_costs_less(self, base: nn.Module, adapters: list[str]) -> bool:
        """Whether a training step computes the update for less folded than by blocks, in units of the layer's own
        matmul. By blocks: three products of the block grid with rank-r tensors (one in forward, two in backward),
        each ``r / b**2``. Folded: the weight gradient ``g.T @ x``, one unit, where one adapter without dropout
        folds into a weight not in 4-bit; else three (the update's own matmul, forward and backward). With 16x16
        blocks, folding pays from rank 86, or from rank 256 where it cannot fold into the weight. (A 4-bit base in
        evaluation compares one product with one matmul: the same threshold.)"""
        rank = sum(self.r[name] for name in adapters)
        folds_into_weight = len(adapters) == 1 and self._folds_into_weight(base, adapters[0])
        return 3 * rank >= (1 if folds_into_weight else 3) * self.pruned.block_size ** 2

    def _folds_into_weight(self, base: nn.Module, name: str) -> bool:
        """Whether adapter ``name``'s folded update joins the base weight in one matmul: not a 4-bit weight, which
        has its own kernel, and not in training through dropout, which must see the update's input alone."""
        return not is_4bit(base.weight) and (isinstance(self.lora_dropout[name], nn.Identity) or not self.training)

    def _forward_by_blocks(self, x: torch.Tensor, base: nn.Module, adapters: list[str]) -> torch.Tensor:
        result = base(x)
        for name in adapters:
            update = block_masked_update(self.lora_dropout[name](x), self.lora_A[name].weight,
                                         self.lora_B[name].weight, self.scaling[name], self.pruned)
            result = result + update.to(result.dtype)
        return result

    def _forward_folded(self, x: torch.Tensor, base: nn.Module, adapters: list[str]) -> torch.Tensor:
        result = None
        for name in adapters:
            lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
            if result is None and self._folds_into_weight(base, name):
                result = MaskedLoraFunction.apply(x, base.weight, lora_A, lora_B, self.scaling[name], self.pruned)
                if base.bias is not None:
                    result = result + base.bias
            else:  # the update in a matmul of its own: dropout sees only its input, a 4-bit base has its own kernel
                if result is None:
                    result = base(x)
                result = result + MaskedLoraFunction.apply(self.lora_dropout[name](x), None, lora_A, lora_B,
                                                           self.scaling[name], self.pruned)
        return result


def sparse_lora_config(config: LoraConfig) -> LoraConfig:
    """``config`` (changed in place) such that ``get_peft_model`` adds ``MaskedLoraLinear`` layers to linear layers.

    Refused: LoRA variants (DoRA and the others PEFT marks so in ``LoraConfig``: their forward and merge are not
    ``W + s * B @ A``), a LoRA bias, and initializations that rewrite the base weight.
    """
    marked = [field.name for field in dataclasses.fields(config) if field.metadata.get("is_lora_variant")]
    if "use_dora" not in marked:  # PEFT before 0.20 marks no variant: none would be seen, none refused
        raise UserError("sparse LoRA needs peft >= 0.20, whose LoraConfig marks the LoRA variants (DoRA, ...) it "
                        "must refuse: pip install 'peft>=0.20,<1'")
    variants = [name for name in marked if getattr(config, name)]
    if variants or config.lora_bias:
        raise UserError(f"sparse LoRA supports plain LoRA adapters, not {', '.join(variants) or 'lora_bias'}")
    if config.init_lora_weights not in BASE_PRESERVING_INITS:
        raise UserError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, pruned blocks "
                        f"included: sparse LoRA takes {', '.join(map(repr, BASE_PRESERVING_INITS))}")
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    return config


def attach_masks(peft_model: PeftModel, masks: SparsityMasks) -> PeftModel:
    """Give every sparse-LoRA layer the mask of its base weight; refuse any other adapter on a pruned weight. A 4-bit
    base (QLoRA) is kept in bitsandbytes' standard layout (``pin_standard_4bit_layout``)."""
    pin_standard_4bit_layout(peft_model)
    by_base_layer = {masks.linears[name]: mask for name, mask in masks.masks.items()}
    for name, module in peft_model.named_modules():
        if isinstance(module, MaskedLoraLinear):
            module.pruned = by_base_layer.get(module.get_base_layer())
        elif isinstance(module, BaseTunerLayer) and module.get_base_layer() in by_base_layer:
            raise UserError(f"{name} is a {type(module).__module__}.{type(module).__name__} adapter on a pruned "
                            "weight: its update would fill the pruned blocks. Add LoRA adapters with "
                            "dense_ft.sparse_lora.add_sparse_lora or load_sparse_lora, or give the trainer "
                            "peft_config=LoraConfig(...)")
    return peft_model


def has_sparse_lora(model: nn.Module) -> bool:
    return any(isinstance(module, MaskedLoraLinear) and module.pruned is not None for module in model.modules())


def add_sparse_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """``get_peft_model`` with every adapted layer masked by the pruned blocks of ``model``."""
    masks = SparsityMasks(model)
    return attach_masks(get_peft_model(model, sparse_lora_config(config)), masks)


def check_adapter_source(adapter: str) -> None:
    if os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if not os.path.isdir(adapter) and looks_like_local_path(adapter):
        raise UserError(f"adapter directory not found: {adapter}")


def load_lora_as_saved(model: nn.Module, adapter: str, masks: SparsityMasks, is_trainable: bool = False,
                       **hub_kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` with every LoRA update masked by ``masks`` (the pruned ``model``'s);
    ``modules_to_save`` copies as saved. ``hub_kwargs`` (``cache_dir``, ``token``) say where a Hub adapter's files
    are stored."""
    check_adapter_source(adapter)
    try:
        config = LoraConfig.from_pretrained(adapter, **hub_kwargs)
    except Exception as error:  # a missing Hub id, a malformed config: one line either way
        raise UserError(f"cannot load adapter {adapter!r}: {first_line(error)}") from error
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise UserError(f"{adapter} is a {config.peft_type} adapter, not LoRA")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, config=sparse_lora_config(config),
                                               is_trainable=is_trainable, **hub_kwargs)
    except RuntimeError as error:  # torch's load_state_dict
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise another_models_adapter(adapter, config, mismatch) from error
    check_every_weight_loaded(peft_model, adapter, config, **hub_kwargs)
    return attach_masks(peft_model, masks)


def check_every_weight_loaded(peft_model: PeftModel, adapter: str, config: LoraConfig, **hub_kwargs) -> None:
    """PEFT adds adapters where the model has the modules and drops, unsaid, the weights of modules it lacks:
    an adapter of another model would merge in part."""
    loaded = get_peft_model_state_dict(peft_model).keys()
    unloaded = sorted(key for key in load_peft_weights(adapter, **hub_kwargs) if ".lora_" in key and key not in loaded)
    if unloaded:
        module = unloaded[0].removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        raise another_models_adapter(adapter, config, f"{len(unloaded)} of its weights are for modules this model "
                                                      f"lacks ({module}, ...)")


def another_models_adapter(adapter: str, config: LoraConfig, detail: str) -> UserError:
    return UserError(f"{adapter} was trained on another model ({config.base_model_name_or_path}): {detail}")


def load_sparse_lora(model: nn.Module, adapter: str, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter on a pruned ``model``, masked as in training: the LoRA updates,
    and each ``modules_to_save`` copy of a pruned weight (trained whole, by plain PEFT maybe), whose pruned blocks
    are reset to zero. So the model computes what its ``merge_and_unload()`` holds, which keeps every pruned block
    zero."""
    masks = SparsityMasks(model)
    peft_model = load_lora_as_saved(model, adapter, masks, is_trainable)
    mask_pruned_weight_copies(peft_model, masks)
    return peft_model


def pruned_weight_copies(peft_model: PeftModel, masks: SparsityMasks):
    """``(copy, pruned weight, mask)`` for each active ``modules_to_save`` copy of a pruned weight."""
    mask_of = {masks.linears[name]: mask for name, mask in masks.masks.items()}
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper) and module.original_module in mask_of and module.active_adapters:
            original = module.original_module
            yield module.modules_to_save[module.active_adapters[0]].weight, original.weight, mask_of[original]


@torch.no_grad()
def mask_pruned_weight_copies(peft_model: PeftModel, masks: SparsityMasks) -> None:
    for copy, _, mask in pruned_weight_copies(peft_model, masks):
        mask.apply_(copy)


def lora_config(rank: int, alpha: float, dropout: float, target_modules: list[str]) -> LoraConfig:
    """A ``LoraConfig`` for these module names, or for PEFT's ``all-linear`` (every linear layer but the output)."""
    targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
