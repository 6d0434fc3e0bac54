"""Training rows: the shipped GSM8K subset and user datasets (files, Hub) in TRL's formats."""

from __future__ import annotations

import json

import pytest

from sparse_unsloth.data import GSM8K_SPLITS, gsm8k_sft_rows, load_gsm8k
from sparse_unsloth.datasets_io import DatasetError, load_rows, normalize_rows, split_rows

PC = [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "Q: 2+2?\nA:", "completion": " 4"}]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_gsm8k_rows():
    assert len(load_gsm8k("train")) == GSM8K_SPLITS["train"] and len(load_gsm8k("test")) == GSM8K_SPLITS["test"]
    row = gsm8k_sft_rows("test", 1)[0]
    assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
    assert row["completion"].startswith(" ") and "####" in row["completion"]
    assert load_rows("gsm8k", 5) == gsm8k_sft_rows("train", 5)
    assert load_rows("gsm8k", 5000, split="test") == gsm8k_sft_rows("test")   # capped at what is shipped
    with pytest.raises(ValueError, match="only the first 300"):
        load_gsm8k("test", 301)
    with pytest.raises(DatasetError, match="splits"):
        load_rows("gsm8k", split="validation")


def test_formats_are_normalized():
    assert normalize_rows(PC, "x") == PC
    qa = normalize_rows([{"question": "How many? ", "answer": "3\n#### 3", "id": 7}], "x")
    assert qa == [{"prompt": "Question: How many?\nAnswer:", "completion": " 3\n#### 3"}]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert normalize_rows([{"messages": chat}], "x") == [{"prompt": chat[:1], "completion": chat[1:]}]
    assert normalize_rows([{"text": "plain"}], "x") == [{"text": "plain"}]


@pytest.mark.parametrize("rows, message", [
    ([], "has no rows"),
    ([["a", "b"]], "rows must be JSON objects"),
    ([{"input": "a", "output": "b"}], r"columns \['input', 'output'\]; expected prompt\+completion"),
    ([PC[0], {"prompt": "x"}], r"row 1 lacks column\(s\) \['prompt', 'completion'\]"),
    ([PC[0], {"prompt": "x", "completion": 5}], "row 1: 'prompt' and 'completion' must both be"),
    ([{"question": "", "answer": "1"}], "row 0: 'question' and 'answer' must be non-empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "last of 'messages' must be an assistant turn"),
    ([{"messages": "hi"}], "'messages' must be a non-empty list"),
])
def test_malformed_rows_name_the_problem(rows, message):
    with pytest.raises(DatasetError, match=message):
        normalize_rows(rows, "my.jsonl")


def test_text_rows_warn_that_nothing_is_sparse(caplog):
    with caplog.at_level("WARNING", logger="sparse_unsloth"):
        normalize_rows([{"text": "a"}], "t.jsonl")
    assert "cannot speed it up" in caplog.text


def test_local_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert load_rows(_write_jsonl(tmp_path / "a.jsonl", PC)) == PC
    (tmp_path / "b.json").write_text(json.dumps(PC))
    (tmp_path / "c.json").write_text(json.dumps({"data": PC}))
    _write_jsonl(tmp_path / "d.json", PC)                                   # JSON lines named .json
    pq.write_table(pa.Table.from_pylist(PC), tmp_path / "e.parquet")
    for name in ("b.json", "c.json", "d.json", "e.parquet"):
        assert load_rows(str(tmp_path / name)) == PC, name
    assert load_rows(str(tmp_path / "a.jsonl"), n=1) == PC[:1]


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "does not exist"),
    ("rows.csv", "prompt,completion\n", r"unsupported type \.csv"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n', "line 2 is not valid JSON"),
    ("scalar.json", "42", "expected a list of objects"),
    ("bad.parquet", "not parquet", "not a readable parquet file"),
])
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_rows(str(tmp_path / name))


def test_hub_dataset_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetError, match="could not load Hub dataset 'openai/gsm8k:main'.*HF_HUB_OFFLINE"):
        load_rows("openai/gsm8k:main")


def test_split_rows():
    rows = [{"text": str(i)} for i in range(5)]
    assert split_rows(rows, 2) == (rows[:3], rows[3:])
    assert split_rows(rows, 0) == (rows, [])
    with pytest.raises(DatasetError, match="lower --eval-rows"):
        split_rows(rows, 5)
