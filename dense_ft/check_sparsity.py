"""Sparsity report of a model directory: ``python -m dense_ft.check_sparsity MODEL_DIR``.

With ``--reference PRUNED_DIR`` it also counts the weights that are pruned in the reference
(its recorded 16x16 blocks, or its zeros) but not zero in MODEL_DIR, and exits 1 if any is.
"""

import argparse
import json
import sys

from dense_ft.errors import exit_on_user_error
from dense_ft.masks import SparsityMasks
from dense_ft.modeling import load_weights
from dense_ft.sparsity import layer_sparsity

WORST_LAYERS_SHOWN = 10


def report(args) -> dict:
    model = load_weights(args.model_dir)
    layers = layer_sparsity(model)
    zeros = sum(z for z, _ in layers.values())
    total = sum(n for _, n in layers.values())
    result = {"model": args.model_dir, "sparsity": zeros / total if total else 0.0, "zeros": zeros, "weights": total}
    if args.per_layer:
        result["layers"] = {name: z / n for name, (z, n) in layers.items()}
    if args.reference:
        violations = SparsityMasks(load_weights(args.reference)).violations(model)
        result.update(reference=args.reference, violations=sum(violations.values()), violating_layers=violations)
    return result


def print_report(result: dict) -> None:
    if "layers" in result:
        width = max(map(len, result["layers"]))
        for name, sparsity in result["layers"].items():
            print(f"{name:<{width}}  {sparsity:.4f}")
    print(f"Sparsity: {result['sparsity']:.4f}")
    if "violations" in result:
        print(f"Pruned weights of {result['reference']} that are non-zero: {result['violations']}")
        worst = sorted(result["violating_layers"].items(), key=lambda item: -item[1])[:WORST_LAYERS_SHOWN]
        for name, count in worst:
            print(f"  {name}: {count}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="model directory (or Hub id)")
    parser.add_argument("--reference", help="the pruned model MODEL_DIR was fine-tuned from")
    parser.add_argument("--per_layer", action="store_true", help="sparsity of every prunable weight")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        result = report(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    sys.exit(1 if result.get("violations") else 0)


if __name__ == "__main__":
    main()
