"""Text sources: plain text read as WikiText is, tables by their text column, run_clm's held-out validation."""

import json
import re

import pytest

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
