"""Merge a PEFT LoRA adapter into a pruned model, keeping every pruned block at zero.

    python -m dense_ft.merge_lora PRUNED_MODEL ADAPTER OUTPUT_DIR

The adapter may come from anywhere (plain PEFT, TRL, another trainer): its update is masked by
the pruned blocks of PRUNED_MODEL before it is added, and the report says how much of it fell
on pruned blocks, that is, what a plain merge would have written there. A ``modules_to_save``
copy of a pruned weight, trained whole, is masked the same way: its pruned blocks are reset to
zero, the rest kept as trained. OUTPUT_DIR is a normal
HF directory that keeps the pruned model's ``sparsity_pattern``; the command exits 1 if any
pruned weight of it is non-zero.
"""

import argparse

import torch
from peft.tuners.lora import Linear as LoraLinear

from dense_ft.check_sparsity import exit_with_report
from dense_ft.errors import UserError, exit_on_user_error
from dense_ft.masks import SparsityMasks
from dense_ft.modeling import DTYPES, check_model_source, load_model, save_model
from dense_ft.output_dir import check_not_an_input, check_output_path
from dense_ft.sparse_lora import (
    MaskedLoraLinear,
    check_adapter_source,
    load_lora_as_saved,
    mask_pruned_weight_copies,
    pruned_weight_copies,
)
from dense_ft.sparsity import check_sparsity
from dense_ft.versions import check_installed_versions


def adapter_updates(peft_model, masks: SparsityMasks):
    """``(update, what the merge adds of it)`` for each adapted weight: LoRA's ``s * B @ A``, and a copy's difference
    from the pruned weight it replaces."""
    for module in peft_model.modules():
        if isinstance(module, MaskedLoraLinear):
            for adapter in module.active_adapters:
                yield LoraLinear.get_delta_weight(module, adapter), module.get_delta_weight(adapter)
    for copy, weight, mask in pruned_weight_copies(peft_model, masks):
        update = copy - weight
        kept = update.clone()
        mask.apply_(kept)
        yield update, kept


@torch.no_grad()
def update_on_pruned_blocks(peft_model, masks: SparsityMasks) -> dict:
    """Frobenius norms of the adapter's update, whole and on pruned blocks, and the pruned weights it touches."""
    whole_sq = pruned_sq = 0.0
    touched = 0
    for update, kept in adapter_updates(peft_model, masks):
        on_pruned = update.float() - kept.float()
        whole_sq += update.float().pow(2).sum().item()
        pruned_sq += on_pruned.pow(2).sum().item()
        touched += int(on_pruned.count_nonzero())
    return {"update_norm": whole_sq**0.5, "update_norm_on_pruned_blocks": pruned_sq**0.5,
            "fraction_of_norm_on_pruned_blocks": (pruned_sq / whole_sq) ** 0.5 if whole_sq else 0.0,
            "pruned_weights_a_plain_merge_would_change": touched}


def check_paths(pruned_model: str, adapter: str, output_dir: str) -> None:
    """Before any work: an adapter, a pruned model that is not one, and an output that overwrites neither."""
    check_adapter_source(adapter)
    check_model_source(pruned_model)
    check_output_path(output_dir, "output_dir")
    check_not_an_input(output_dir, "output_dir", {"pruned_model": pruned_model, "adapter": adapter})


def merge(pruned_model: str, adapter: str, output_dir: str, torch_dtype: str = "float32", revision: str | None = None,
          tokenizer_name: str | None = None, trust_remote_code: bool = False, **hub_kwargs) -> dict:
    """Merge ``adapter`` into ``pruned_model`` (unquantized, in ``torch_dtype``, at ``revision`` on the Hub, running
    its code if ``trust_remote_code``) and save it with the pruned model's tokenizer, or ``tokenizer_name``'s; the
    report. ``hub_kwargs`` (``cache_dir``, ``token``) go to the loading of all three."""
    check_paths(pruned_model, adapter, output_dir)
    model, tokenizer = load_model(pruned_model, torch_dtype, tokenizer_name=tokenizer_name, revision=revision,
                                  trust_remote_code=trust_remote_code, **hub_kwargs)
    masks = SparsityMasks(model)
    if not masks:
        raise UserError(f"{pruned_model} has no pruned weights: there is nothing for the mask to keep")
    peft_model = load_lora_as_saved(model, adapter, masks, **hub_kwargs)  # the copies as trained, for the report
    report = {"pruned_model": pruned_model, "adapter": adapter, "output_dir": output_dir,
              **update_on_pruned_blocks(peft_model, masks)}
    mask_pruned_weight_copies(peft_model, masks)
    merged = peft_model.merge_and_unload()
    violations = masks.violations(merged)
    save_model(merged, tokenizer, output_dir)
    return {**report, "violations": sum(violations.values()), "sparsity": check_sparsity(merged)}


def print_report(report: dict) -> None:
    print(f"Adapter update norm: {report['update_norm']:.6g}")
    print(f"Of it on pruned blocks (removed by the mask): {report['update_norm_on_pruned_blocks']:.6g} "
          f"({100 * report['fraction_of_norm_on_pruned_blocks']:.2f}%)")
    print("Pruned weights a plain merge would have made non-zero: "
          f"{report['pruned_weights_a_plain_merge_would_change']:,}")
    print(f"Pruned weights of the merged model that are non-zero: {report['violations']}")
    print(f"Merged model saved to {report['output_dir']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned_model", help="the pruned model the adapter was trained on (directory or Hub id)")
    parser.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json, adapter_model.*)")
    parser.add_argument("output_dir", help="where to save the merged model")
    parser.add_argument("--torch_dtype", choices=DTYPES, default="float32", help="dtype of the merge")
    parser.add_argument("--cache_dir", help="where the model and adapter fetched from the Hub are stored (default: "
                                            "the Hugging Face cache)")
    parser.add_argument("--tokenizer_name", help="the tokenizer saved with the merge, if not the pruned model's (a "
                                                 "model saved without one): directory or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the code the pruned model comes with (read it first)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        check_installed_versions()
        report = merge(args.pruned_model, args.adapter, args.output_dir, args.torch_dtype,
                       tokenizer_name=args.tokenizer_name, trust_remote_code=args.trust_remote_code,
                       cache_dir=args.cache_dir)
    exit_with_report(report, args.json, print_report)


if __name__ == "__main__":
    main()
