"""Before the GPU checks: the packages they import, against requirements.txt, and the embedded tokenizer.

A machine lent for minutes should not find a package missing or broken halfway through the run:
this exits 1 at once, naming what the checks cannot run without. What only some checks need is a
warning.

    python bench/preflight.py
"""

import importlib
import importlib.metadata
import sys
from pathlib import Path

import prepare_embedded  # scripts/

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
REQUIRED = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors")
OPTIONAL = {"torchao": "8bit-sr-distill and the launcher's 8-bit test fail without it",
            "bitsandbytes": "qlora-sparse fails without it"}


def pins() -> dict[str, str]:
    """``name: version`` of every ``name==version`` line of requirements.txt."""
    lines = (line.partition("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return dict(line.split("==", 1) for line in lines if "==" in line)


def import_problem(name: str) -> str | None:
    """Why ``import name`` fails (its first line), or None when it works."""
    try:
        importlib.import_module(name)
    except Exception as error:  # a missing package, or a broken one (a dependency too old, say)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def main() -> int:
    pinned = pins()
    unusable = []
    for name in (*REQUIRED, *OPTIONAL):
        problem = import_problem(name)
        if problem is not None:
            unusable.append(name)
            print(f"{name}: {problem}")
            continue
        found = importlib.metadata.version(name)
        print(f"{name} {found}" + (f" (requirements.txt: {pinned[name]})" if pinned.get(name, found) != found else ""))
    for name in set(unusable) & OPTIONAL.keys():
        print(f"Warning: {name} cannot be imported: {OPTIONAL[name]}")
    if not (prepare_embedded.model_dir() / "tokenizer.json").exists() or not (
            prepare_embedded.corpus_dir() / "wiki.train.raw").exists():
        print(f"Warning: the embedded default is not prepared ({prepare_embedded.cache_dir()}): tests/test_gpu.py "
              "needs its tokenizer files and its corpus")
    if required := [name for name in unusable if name in REQUIRED]:
        print(f"error: the GPU checks need {', '.join(required)}: install them first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
