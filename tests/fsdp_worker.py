"""One rank of the FSDP2 mask test, started by ``torchrun --nproc_per_node 2`` from test_distributed.py.

``train`` shards a tiny pruned Llama with ``fully_shard`` (gloo, CPU), keeps only this rank's
rows of each mask, trains a few AdamW steps and saves a distributed checkpoint; ``resume``
loads that checkpoint into a fresh model, re-derives the masks from its shards' zeros and
trains on; ``lora`` adds sparse LoRA adapters before sharding, as ``SparseTrainingMixin`` does with a
``peft_config``, trains them and merges the gathered model; ``fsdp1`` wraps it in FSDP1 instead,
whose flattened parameters the masks refuse. Each rank writes what it saw to ``OUT/rank{R}.{phase}.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama, zero_random_blocks
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from dense_ft.errors import UserError
from dense_ft.masks import SparsityMasks
from dense_ft.sparse_lora import LLAMA_TARGET_MODULES, attach_masks, sparse_lora_config
from dense_ft.sparsity import check_sparsity, prunable_linears

STEPS = 6


def sharded_model(seed: int):
    """A tiny pruned Llama sharded with FSDP2, its pruned positions, and its masks taken before sharding."""
    model = tiny_llama(seed=seed)
    pruned = zero_random_blocks(model)
    masks = SparsityMasks(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, pruned, masks


def train(model, masks, steps: int, seed: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 32), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        masks.apply_to_grads()
        optimizer.step()
        masks.apply_to_weights(trainable_only=True)  # as the trainers do after a step
        optimizer.zero_grad()
    return optimizer


def full_weights_respect(model, pruned) -> bool:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return all(state[f"{name}.weight"][pruned[name]].eq(0).all() for name in prunable_linears(model))


def weight_pass_reaches_the_shards(model, masks) -> bool:
    """Whether ``apply_to_weights`` zeroes the pruned blocks of every filled shard (AdamW alone keeps them zero)."""
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            linear.weight.to_local().add_(1.0)
    filled = bool(masks.violations())
    masks.apply_to_weights()
    return filled and masks.violations() == {}


def sparse_lora_model(seed: int = 0):
    """A tiny pruned Llama with sparse LoRA adapters (random B: the update is non-zero from the start), its
    pruned positions, and its masks, the way the mixin builds them from a ``peft_config``."""
    model = tiny_llama(seed=seed)
    pruned = zero_random_blocks(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGET_MODULES), init_lora_weights=False)
    peft_model = get_peft_model(model, sparse_lora_config(config))
    masks = SparsityMasks(peft_model)
    return attach_masks(peft_model, masks), pruned, masks


def fsdp2_lora_report() -> dict:
    model, pruned, masks = sparse_lora_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    masks.match_local_shards()
    before = {name: p.detach().full_tensor().clone() for name, p in model.named_parameters() if p.requires_grad}
    train(model, masks, STEPS, seed=0)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    unsharded, _, _ = sparse_lora_model()
    unsharded.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        same_function = torch.allclose(model(input_ids=ids).logits, unsharded(input_ids=ids).logits, atol=1e-5)
    merged = unsharded.merge_and_unload()
    return dict(
        base_shard_shape=list(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
                              .to_local().shape),
        adapters_trained=all(not torch.equal(before[name], state[name]) for name in before),
        sharded_equals_unsharded=same_function,
        merged_pruned_nonzero=sum(int(linear.weight[pruned[name]].ne(0).sum())
                                  for name, linear in prunable_linears(merged).items()),
    )


def fsdp1_refusal() -> str:
    model = tiny_llama()
    zero_random_blocks(model)
    masks = SparsityMasks(model)
    FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    try:
        masks.match_local_shards()
    except UserError as error:
        return str(error)
    return "not refused"


def fsdp2_report(out: Path, phase: str) -> dict:
    model, pruned, masks = sharded_model(seed=0 if phase == "train" else 1)
    full_mask_bytes = masks.nbytes
    if phase == "train":
        masks.match_local_shards()  # what SparseTrainer does once FSDP2 has sharded the model
        optimizer = train(model, masks, STEPS, seed=0)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(out / "checkpoint"))
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(out / "checkpoint"))
        set_model_state_dict(model, state["model"])
        masks = SparsityMasks(model)  # re-derived from the zeros of this rank's loaded shards
        train(model, masks, STEPS, seed=100)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    report = dict(
        local_mask_bytes=masks.nbytes, full_mask_bytes=full_mask_bytes,
        local_q_proj_shape=list(q_proj.to_local().shape), global_q_proj_shape=list(q_proj.shape),
        local_masks={name: mask.pruned_blocks.tolist() for name, mask in masks.masks.items()
                     if mask.pruned_blocks.any()},
        violations=masks.violations(), sparsity=check_sparsity(model),
        full_weights_respect_masks=bool(full_weights_respect(model, pruned)),
    )
    return report | {"weight_pass_reaches_the_shards": weight_pass_reaches_the_shards(model, masks)}


def main(out: Path, phase: str) -> None:
    dist.init_process_group("gloo")
    if phase == "fsdp1":
        report = {"refusal": fsdp1_refusal()}
    elif phase == "lora":
        report = fsdp2_lora_report()
    else:
        report = fsdp2_report(out, phase)
    (out / f"rank{dist.get_rank()}.{phase}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
