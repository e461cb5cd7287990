"""Text sources: plain text read as WikiText is, tables by their text column, run_clm's held-out validation."""

import json
import re

import pytest
from datasets import Dataset, IterableDatasetDict

from dense_ft.errors import UserError
from dense_ft.text import hold_out_validation, load_text_files

ROWS = [{"id": 1, "text": "First paragraph."}, {"id": 2, "text": None}, {"id": 3, "text": "Third, with a comma."}]


def write_table(path, rows):
    if path.suffix == ".csv":
        lines = ["id,text"] + [f"{row['id']},\"{row['text'] or ''}\"" for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv"])
def test_a_table_gives_its_text_column_alone(name, tmp_path):
    corpus = load_text_files({"train": write_table(tmp_path / name, ROWS)})
    assert corpus["train"].column_names == ["text"]
    assert corpus["train"]["text"] == ["First paragraph.", "", "Third, with a comma."]


@pytest.mark.parametrize("rows, message", [
    ([{"content": "words"}], "needs a column 'text' of strings to train on; it has columns content"),
    ([{"text": 7}], "needs a column 'text' of strings to train on; it has a Value('int64') column 'text'"),
])
def test_a_table_without_text_is_refused(rows, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        load_text_files({"train": write_table(tmp_path / "train.jsonl", rows)})


def test_files_of_different_kinds_and_malformed_json_are_refused(tmp_path):
    (tmp_path / "valid.txt").write_text("Plain text.\n")
    with pytest.raises(UserError, match="the data files are of different kinds"):
        load_text_files({"train": write_table(tmp_path / "train.jsonl", ROWS),
                         "validation": str(tmp_path / "valid.txt")})
    (tmp_path / "bad.json").write_text('{"text": "abc"\n{oops')
    with pytest.raises(UserError, match=r"cannot read .*bad.json as json: JSON parse error"):
        load_text_files({"train": str(tmp_path / "bad.json")})


def test_the_held_out_validation_is_the_first_rows_as_in_run_clm(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    corpus = hold_out_validation(load_text_files({"train": str(tmp_path / "train.txt")}), 5)
    assert corpus["validation"]["text"] == ["line 0\n", "line 1\n"]
    assert corpus["train"]["text"] == [f"line {i}\n" for i in range(2, 40)]


def test_a_stream_holds_out_the_first_rows_of_every_hundred_as_run_clm_does():
    rows = Dataset.from_dict({"text": [f"line {i}" for i in range(250)]}).to_iterable_dataset()
    corpus = hold_out_validation(IterableDatasetDict({"train": rows}), 3)
    held_out = [i for i in range(250) if i % 100 < 3]
    assert [row["text"] for row in corpus["validation"]] == [f"line {i}" for i in held_out]
    assert [row["text"] for row in corpus["train"]] == [f"line {i}" for i in range(250) if i not in held_out]


def test_lines_lose_their_line_breaks_only_when_asked(tmp_path):
    (tmp_path / "train.txt").write_text("one\n\ntwo\n")
    assert load_text_files({"train": str(tmp_path / "train.txt")})["train"]["text"] == ["one\n", "", "two\n"]
    joined = load_text_files({"train": str(tmp_path / "train.txt")}, keep_linebreaks=False)
    assert joined["train"]["text"] == ["one", "", "two"]
