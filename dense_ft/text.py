"""Text corpora for calibration, training and evaluation, from the Hub or local files.

Every source becomes a ``DatasetDict`` with a ``text`` column and the splits ``train``,
``validation`` and ``test`` (those the source has), rows as in the Hub's ``wikitext``: one
line each, with its line break, and blank lines as empty strings.
"""

import os

from datasets import DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from .errors import UserError, first_line
from .modeling import looks_like_local_path

WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1")
# The file names of the WikiText raw zip, by split.
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def _blank_lines_empty(row: dict) -> dict:
    return {"text": row["text"] if row["text"].strip() else ""}


def load_text_files(files: dict[str, str]) -> DatasetDict:
    """Plain text files, one row per line, by split."""
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"text file not found: {', '.join(missing)}")
    empty = [path for path in files.values() if os.path.getsize(path) == 0]
    if empty:
        raise UserError(f"text file is empty: {', '.join(empty)}")
    try:
        corpus = load_dataset("text", data_files=files, keep_linebreaks=True)
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise UserError(_not_utf8(files.values())) from error
        raise
    return corpus.map(_blank_lines_empty, desc="Reading text")


def _not_utf8(paths) -> str:
    """Which file is not UTF-8, and where (read again only once loading has failed)."""
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path} is not UTF-8 text (byte {error.start}): convert it, e.g. with iconv -t utf-8"
    return "a text file is not UTF-8 text"


def load_wikitext_dir(directory: str, splits=tuple(WIKITEXT_FILES)) -> DatasetDict:
    """A local directory in the WikiText raw layout (``wiki.{train,valid,test}.raw``)."""
    files = {split: os.path.join(directory, WIKITEXT_FILES[split]) for split in splits}
    missing = [os.path.basename(path) for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"corpus directory {directory!r} lacks {', '.join(missing)}")
    return load_text_files(files)


def load_corpus(source: str, config_name: str | None = None, splits=tuple(WIKITEXT_FILES)) -> DatasetDict:
    """``wikitext2`` (the Hub's wikitext-2-raw-v1), a local WikiText-layout directory, or a Hub data set."""
    if os.path.isdir(source):
        return load_wikitext_dir(source, splits)
    if source == "wikitext2":
        source, config_name = WIKITEXT2
    elif looks_like_local_path(source):
        raise UserError(f"corpus directory not found: {source}")
    try:
        corpus = load_dataset(source, config_name)
    except Exception as error:  # the Hub's errors are many; all mean the same to the user
        raise UserError(f"cannot load data set {source!r} ({config_name}): {type(error).__name__}: "
                        f"{first_line(error)}") from error
    absent = [split for split in splits if split not in corpus]
    if absent:
        raise UserError(f"data set {source!r} has no split {', '.join(absent)}")
    return corpus


def joined_text(corpus: DatasetDict, split: str, separator: str) -> str:
    return separator.join(corpus[split]["text"])
