"""Sparsity report of a model directory: ``python -m dense_ft.check_sparsity MODEL_DIR``.

With ``--reference PRUNED_DIR`` it also counts the weights that are pruned in the reference
(its recorded 16x16 blocks, or its zeros) but not zero in MODEL_DIR, and exits 1 if any is.
A model whose ``sparsity_pattern`` is Wanda's is checked against itself as well: Wanda prunes
exactly ``floor(ratio x blocks)`` blocks of every matrix, so fewer zero blocks are pruned blocks
lost (counted, exit 1), with or without a reference.

Both models are read one tensor at a time from their safetensors files (sharded or not), never
loaded whole: memory is about the largest pair of tensors, whatever the size of the models.
"""

import argparse
import json
import os
import re
import sys

from safetensors import safe_open

from dense_ft.errors import UserError, exit_on_user_error, first_line
from dense_ft.masks import ElementMask, blocks_lost, capture_mask, is_unstructured_pruning, prunes_exact_counts
from dense_ft.modeling import check_model_source
from dense_ft.sparsity import PATTERN_KEY, validate_pattern
from dense_ft.versions import check_installed_versions

WORST_LAYERS_SHOWN = 10
# The decoder layers' linear weights, as prunable_linears names their modules (plus ".weight").
_PRUNABLE_WEIGHT = re.compile(r"(^|\.)layers\.\d+\.(?!.*\.lora_).*\.weight$")
_INDEX = "model.safetensors.index.json"


class SafetensorsModel:
    """A model directory's config and tensors, each tensor read from its file only when asked for."""

    def __init__(self, source: str, cache_dir: str | None = None):
        check_model_source(source)
        self.path = source if os.path.isdir(source) else _download(source, cache_dir)
        with open(os.path.join(self.path, "config.json")) as f:
            self.config = json.load(f)
        if self.config.get(PATTERN_KEY) is not None:
            validate_pattern(self.config[PATTERN_KEY], source)
        self.files = {}  # tensor name -> file
        if os.path.isfile(os.path.join(self.path, _INDEX)):
            with open(os.path.join(self.path, _INDEX)) as f:
                self.files = {name: os.path.join(self.path, file) for name, file in json.load(f)["weight_map"].items()}
        elif os.path.isfile(os.path.join(self.path, "model.safetensors")):
            file = os.path.join(self.path, "model.safetensors")
            self.files = dict.fromkeys(_read(file, lambda f: f.keys()), file)
        else:
            raise UserError(f"{source} has no safetensors weights (model.safetensors or {_INDEX})")

    @property
    def block_size(self) -> int | None:
        return self.pattern["block_size"] if self.pattern else None

    @property
    def pattern(self) -> dict | None:
        return self.config.get(PATTERN_KEY)

    def prunable_weights(self) -> list[str]:
        """Names of the decoder layers' matrices, in layer order."""
        names = [name for name in self.files if _PRUNABLE_WEIGHT.search(name) and len(self.shape(name)) == 2]
        return sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])

    def shape(self, name: str) -> list[int]:
        return _read(self.files[name], lambda f: f.get_slice(name).get_shape())

    def tensor(self, name: str):
        return _read(self.files[name], lambda f: f.get_tensor(name))


def _read(file: str, what):
    """``what(opened file)``; a truncated or corrupted file is one line naming it, not a traceback."""
    try:
        with safe_open(file, "pt") as f:
            return what(f)
    except Exception as error:
        raise UserError(f"cannot read {file}: {first_line(error)}") from error


def _download(repo_id: str, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir)
    except Exception as error:  # the Hub's errors are many; all mean the same here
        raise UserError(f"cannot load model {repo_id!r}: {first_line(error)}") from error


def _layer(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def report(args) -> dict:
    model = SafetensorsModel(args.model_dir, args.cache_dir)
    names = model.prunable_weights()
    reference = SafetensorsModel(args.reference, args.cache_dir) if args.reference else None
    if reference is not None and reference.prunable_weights() != names:
        raise UserError(f"{args.model_dir} and the reference {args.reference} do not have the same prunable layers")
    zeros, sizes, block_violations, scattered_violations, lost = {}, {}, {}, {}, {}
    scattered_zeros = 0
    checks_its_own_blocks = model.pattern is not None and prunes_exact_counts(model.pattern)
    for name in names:
        weight = model.tensor(name)
        zeros[name], sizes[name] = int((weight == 0).sum()), weight.numel()
        if checks_its_own_blocks:
            lost[_layer(name)] = blocks_lost(model.pattern, weight.shape, capture_mask(weight, model.block_size))
        if reference is not None:
            pruned = reference.tensor(name)
            if pruned.shape != weight.shape:
                raise UserError(f"{_layer(name)} is {tuple(weight.shape)} in {args.model_dir} but "
                                f"{tuple(pruned.shape)} in the reference")
            mask = capture_mask(pruned, reference.block_size)
            if isinstance(mask, ElementMask):
                scattered_zeros += mask.num_pruned
                scattered_violations[_layer(name)] = mask.count_nonzero(weight)
            elif mask is not None:
                block_violations[_layer(name)] = mask.count_nonzero(weight)
    total = sum(sizes.values())
    if reference is not None and not is_unstructured_pruning(scattered_zeros, total):
        scattered_violations = {}  # a dense reference's stray zeros, as SparsityMasks judges them
    if reference is not None and not block_violations and not scattered_violations:
        raise UserError(f"the reference {args.reference} is not pruned (no pruned blocks and no sparsity_pattern): "
                        "there is nothing to check against; give the pruned model the run started from")
    violations = {name: count for name, count in {**block_violations, **scattered_violations}.items() if count}
    result = {"model": args.model_dir, "sparsity": sum(zeros.values()) / total if total else 0.0,
              "zeros": sum(zeros.values()), "weights": total}
    if args.per_layer:
        result["layers"] = {_layer(name): zeros[name] / sizes[name] for name in names}
    if checks_its_own_blocks:
        result.update(pruned_blocks_lost=sum(lost.values()),
                      layers_that_lost_blocks={name: count for name, count in lost.items() if count})
    if reference is not None:
        result.update(reference=args.reference, violations=sum(violations.values()), violating_layers=violations)
    return result


def print_report(result: dict) -> None:
    if "layers" in result:
        width = max(map(len, result["layers"]))
        for name, sparsity in result["layers"].items():
            print(f"{name:<{width}}  {sparsity:.4f}")
    print(f"Sparsity: {result['sparsity']:.4f}")
    if "pruned_blocks_lost" in result:
        print(f"Pruned blocks no longer zero (of the floor(ratio x blocks) its Wanda pattern pruned in each "
              f"matrix): {result['pruned_blocks_lost']}")
        _print_worst(result["layers_that_lost_blocks"])
    if "violations" in result:
        print(f"Pruned weights of {result['reference']} that are non-zero: {result['violations']}")
        _print_worst(result["violating_layers"])


def _print_worst(counts: dict[str, int]) -> None:
    for name, count in sorted(counts.items(), key=lambda item: -item[1])[:WORST_LAYERS_SHOWN]:
        print(f"  {name}: {count}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="model directory (or Hub id)")
    parser.add_argument("--reference", help="the pruned model MODEL_DIR was fine-tuned from")
    parser.add_argument("--per_layer", action="store_true", help="sparsity of every prunable weight")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cache_dir", help="where models fetched from the Hub are stored (default: the Hugging Face "
                                            "cache)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        check_installed_versions()
        result = report(args)
    exit_with_report(result, args.json, print_report)


def exit_with_report(result: dict, as_json: bool, print_text) -> None:
    """Print a report (as JSON or as text) and exit 1 if it counted any non-zero pruned weight."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_text(result)
    sys.exit(1 if result.get("violations") or result.get("pruned_blocks_lost") else 0)


if __name__ == "__main__":
    main()
