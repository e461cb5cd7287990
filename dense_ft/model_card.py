"""Model cards: the ``README.md`` a saved model directory carries, as Hugging Face's own scripts write.

YAML metadata the Hub reads (``base_model``, ``library_name``, ``tags``), then what the model is:
base model, pruning pattern, data, recipe, results and the sparsity check.
"""

import os

from .sparsity import PATTERN_KEY


def _table(rows: dict) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {key} | {_value(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def write_model_card(directory: str, title: str, base_model: str, config, data: str, recipe: dict,
                     results: dict, sparsity: dict) -> None:
    pattern = getattr(config, PATTERN_KEY, None) or {}
    calibration = pattern.get("calibration") or {}
    pruning = {key: value for key, value in pattern.items() if key != "calibration"}
    pruning.update({f"calibration {key}": value for key, value in calibration.items()})
    card = [
        "---", f"base_model: {base_model}", "library_name: transformers",
        "tags:", *(f"- {tag}" for tag in ("sparse", "pruned", f"{pattern.get('method', 'unknown')}-pruning",
                                          "block-sparsity", "dense-ft")),
        "---", "", f"# {title}", "",
        "## Base model", "", f"`{base_model}`", "",
        "## Pruning", "", f"Recorded in `config.json` as `{PATTERN_KEY}`:", "", _table(pruning), "",
        "## Data", "", data, "",
        "## Recipe", "", _table(recipe), "",
        "## Results", "", _table(results), "",
        "## Sparsity check", "", _table(sparsity), "",
        "Written by dense-ft, which keeps pruned weights exactly zero; "
        "`python -m dense_ft.check_sparsity MODEL --reference PRUNED_MODEL` verifies it.", "",
    ]
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write("\n".join(card))
