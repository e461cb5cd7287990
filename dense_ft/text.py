"""Text corpora for calibration, training and evaluation, from the Hub or local files.

Every source becomes a ``DatasetDict`` with a ``text`` column and the splits ``train``,
``validation`` and ``test`` (those the source has), or an ``IterableDatasetDict`` of the same when
``load_dataset`` is asked to stream (``streaming=True``). Plain text files are read as the Hub's
``wikitext`` is: one row per line, with its line break, and blank lines as empty strings;
CSV and JSON (lines) files, and Hub data sets, must have a ``text`` column, the only one kept.
"""

import errno
import os
from contextlib import contextmanager

import datasets
import pandas
import pyarrow
from datasets import Dataset, DatasetDict, IterableDatasetDict, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from .errors import UserError, first_line
from .modeling import looks_like_local_path

WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1")
# The file names of the WikiText raw zip, by split.
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# Data files read as tables (a ``text`` column), by extension; any other file is plain text.
TABLE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}


def _blank_lines_empty(row: dict) -> dict:
    return {"text": row["text"] if row["text"].strip() else ""}


def map_options(corpus: DatasetDict | IterableDatasetDict, **options) -> dict:
    """``map``'s ``options`` for a data set on disk (processes, cache, progress bar): a stream takes none of them."""
    return options if isinstance(corpus, DatasetDict) else {}


def file_builder(path: str) -> str:
    """The ``datasets`` builder that reads ``path``, by its extension as in run_clm.py (anything else is text)."""
    return TABLE_BUILDERS.get(os.path.splitext(path)[1].lower(), "text")


def load_text_files(files: dict[str, str], keep_linebreaks: bool = True,
                    **load_kwargs) -> DatasetDict | IterableDatasetDict:
    """Text files by split: plain text (one row per line, with its line break unless not ``keep_linebreaks``), or
    CSV or JSON (lines) with a ``text`` column; ``load_kwargs`` go to ``load_dataset`` (``cache_dir``: where it
    keeps what it read)."""
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"text file not found: {', '.join(missing)}")
    empty = [path for path in files.values() if os.path.getsize(path) == 0]
    if empty:
        raise UserError(f"text file is empty: {', '.join(empty)}")
    builders = {file_builder(path) for path in files.values()}
    if len(builders) > 1:
        raise UserError(f"the data files are of different kinds ({', '.join(files.values())}): give all of them as "
                        "plain text, CSV or JSON")
    builder = builders.pop()
    options = {"keep_linebreaks": keep_linebreaks} if builder == "text" else {}
    try:
        corpus = load_dataset(builder, data_files=files, **options, **load_kwargs)
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise UserError(_not_utf8(files.values())) from error
        if isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC:
            cache = load_kwargs.get("cache_dir") or datasets.config.HF_DATASETS_CACHE
            raise UserError(f"no space left on the device for the data sets' cache in {cache}: free some space there, "
                            "or give a --cache_dir on another disk") from error
        reason = first_line(error.__cause__ or error)
        raise UserError(f"cannot read {', '.join(files.values())} as {builder}: {reason}") from error
    if builder == "text":
        return corpus.map(_blank_lines_empty, **map_options(corpus, desc="Reading text"))
    return text_column(corpus, " and ".join(files.values()))


def text_column(corpus: DatasetDict | IterableDatasetDict, source: str) -> DatasetDict | IterableDatasetDict:
    """``corpus`` with its ``text`` column alone (a missing value read as empty text); refused without one."""
    features = _features(next(iter(corpus.values())), source)
    if features.get("text") not in (Value("string"), Value("large_string")):
        found = f"a {features['text']} column 'text'" if "text" in features else f"columns {', '.join(features)}"
        raise UserError(f"{source} needs a column 'text' of strings to train on; it has {found}")
    extra = [name for name in features if name != "text"]
    return corpus.remove_columns(extra).map(lambda row: {"text": row["text"] or ""},
                                            **map_options(corpus, desc="Reading text"))


def _features(split, source: str):
    """A split's columns and their types; a stream that does not declare them shows them in its first row."""
    if split.features is not None:
        return split.features
    first_row = next(iter(split), None)
    if first_row is None:
        raise UserError(f"{source} is empty")
    return Dataset.from_list([first_row]).features


def hold_out_validation(corpus: DatasetDict | IterableDatasetDict,
                        percentage: int) -> DatasetDict | IterableDatasetDict:
    """run_clm.py's validation split for a source without one: the first ``percentage`` % of the training rows; of
    a stream, whose length is unknown, the first ``percentage`` rows of every 100."""
    train = corpus["train"]
    if isinstance(corpus, IterableDatasetDict):
        return IterableDatasetDict({
            **corpus, "train": train.filter(lambda _, index: index % 100 >= percentage, with_indices=True),
            "validation": train.filter(lambda _, index: index % 100 < percentage, with_indices=True)})
    held_out = round(len(train) * percentage / 100)
    return DatasetDict({**corpus, "train": train.select(range(held_out, len(train))),
                        "validation": train.select(range(held_out))})


@contextmanager
def stream_errors_as_user_error(source: str):
    """A stream reads its files only as training reads it, and fails there in its builder's own errors (which
    ``load_dataset`` wraps when it reads them whole): those of a file it cannot read become one line."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 text ({error.reason}): convert it, e.g. with iconv -t utf-8") from error
    except (pyarrow.ArrowException, pandas.errors.ParserError) as error:
        raise UserError(f"cannot read {source}: {first_line(error)}") from error


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


def load_wikitext_dir(directory: str, splits=tuple(WIKITEXT_FILES), **load_kwargs) -> DatasetDict:
    """A local directory in the WikiText raw layout (``wiki.{train,valid,test}.raw``)."""
    files = {split: os.path.join(directory, WIKITEXT_FILES[split]) for split in splits}
    missing = [os.path.basename(path) for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"corpus directory {directory!r} lacks {', '.join(missing)}")
    return load_text_files(files, **load_kwargs)


def load_corpus(source: str, config_name: str | None = None, splits=tuple(WIKITEXT_FILES),
                **load_kwargs) -> DatasetDict:
    """``wikitext2`` (the Hub's wikitext-2-raw-v1), a local WikiText-layout directory, or a Hub data set;
    ``load_kwargs`` go to ``load_dataset`` (``cache_dir``, ``token``)."""
    if os.path.isdir(source):
        return load_wikitext_dir(source, splits, **load_kwargs)
    if source == "wikitext2":
        source, config_name = WIKITEXT2
    elif looks_like_local_path(source):
        raise UserError(f"corpus directory not found: {source}")
    try:
        corpus = load_dataset(source, config_name, **load_kwargs)
    except Exception as error:  # the Hub's errors are many; all mean the same to the user
        raise UserError(f"cannot load data set {source!r} ({config_name}): {type(error).__name__}: "
                        f"{first_line(error)}") from error
    absent = [split for split in splits if split not in corpus]
    if absent:
        raise UserError(f"data set {source!r} has no split {', '.join(absent)}")
    return text_column(corpus, f"data set {source!r}")


def joined_text(corpus: DatasetDict, split: str, separator: str) -> str:
    return separator.join(corpus[split]["text"])
