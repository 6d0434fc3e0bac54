"""Training rows from what a user has: a local file, the shipped GSM8K rows, or a Hub dataset.

Every source becomes a list of rows in one of TRL's dataset formats, checked row by row, so a
malformed file fails before a model is loaded:

- ``prompt`` + ``completion`` (strings, or chat-message lists): passed through. TRL sets the
  prompt tokens' labels to -100, so they are SparseLoRA's context tokens (computed sparse).
- ``question`` + ``answer``: turned into prompt/completion (``"Question: ...\\nAnswer:"`` and
  ``" <answer>"``, as for the shipped GSM8K rows).
- ``messages`` (a chat whose last turn is the assistant's): split into a conversational
  prompt (every turn but the last) and completion (the last turn), so only the answer carries
  loss, as above.
- ``text``: language modelling. Every token carries loss, so every token is an output token and
  stays dense: plain text rows get no speed-up from SparseLoRA (a warning says so).

Sources: ``gsm8k`` (the rows shipped in :mod:`sparse_unsloth.data`), a local ``.json`` (a list of
objects, ``{"data": [...]}``, or JSON lines), ``.jsonl`` or ``.parquet`` file, else a Hub dataset
name for :func:`datasets.load_dataset` (``name`` or ``name:config``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import GSM8K_SPLITS, gsm8k_prompt, gsm8k_sft_rows

__all__ = ["FILE_SUFFIXES", "DatasetError", "load_rows", "normalize_rows", "split_rows"]

log = logging.getLogger("sparse_unsloth")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
SHIPPED = "gsm8k"
FORMATS = "prompt+completion, question+answer, messages, or text"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the source, the row and the fix."""


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def _prompt_completion(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if not ((_is_text(prompt) and _is_text(completion)) or (_is_chat(prompt) and _is_chat(completion))):
        raise ValueError("'prompt' and 'completion' must both be non-empty strings, or both lists of "
                         "{role, content} messages")
    return {"prompt": prompt, "completion": completion}


def _question_answer(row: dict) -> dict:
    question, answer = row["question"], row["answer"]
    if not (_is_text(question) and _is_text(answer)):
        raise ValueError("'question' and 'answer' must be non-empty strings")
    return {"prompt": gsm8k_prompt(question), "completion": " " + answer.strip()}


def _messages(row: dict) -> dict:
    messages = row["messages"]
    if not _is_chat(messages):
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError("the last of 'messages' must be an assistant turn after at least one other turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _text(row: dict) -> dict:
    if not _is_text(row["text"]):
        raise ValueError("'text' must be a non-empty string")
    return {"text": row["text"]}


# Column sets in order of preference: a row with both prompt/completion and text is prompt/completion.
_FORMATS: tuple[tuple[tuple[str, ...], Callable[[dict], dict]], ...] = (
    (("prompt", "completion"), _prompt_completion),
    (("question", "answer"), _question_answer),
    (("messages",), _messages),
    (("text",), _text),
)


def normalize_rows(rows: list[Any], source: str) -> list[dict]:
    """``rows`` in one TRL format (see the module doc); :class:`DatasetError` names a bad row."""
    if not rows:
        raise DatasetError(f"dataset {source} has no rows")
    first = rows[0]
    if not isinstance(first, dict):
        raise DatasetError(f"dataset {source}: rows must be JSON objects, row 0 is {type(first).__name__}")
    for columns, convert in _FORMATS:
        if all(c in first for c in columns):
            break
    else:
        raise DatasetError(f"dataset {source} has columns {sorted(first)}; expected {FORMATS}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(c in row for c in columns):
            raise DatasetError(f"dataset {source}: row {i} lacks column(s) {list(columns)} that row 0 has")
        try:
            out.append(convert(row))
        except ValueError as err:
            raise DatasetError(f"dataset {source}: row {i}: {err}") from None
    if columns == ("text",):
        log.warning("dataset %s has only 'text': every token carries loss, so every token is computed "
                    "dense and SparseLoRA cannot speed it up; use prompt/completion rows", source)
    return out


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines in a .json file, as datasets.load_dataset("json") accepts
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        if isinstance(data, list):
            return data
        if data is not None:
            raise DatasetError(f"{path}: expected a list of objects or {{\"data\": [...]}}, "
                               f"got a JSON {type(data).__name__}")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    return rows


def _read_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    if path.suffix not in FILE_SUFFIXES:
        raise DatasetError(f"dataset file {path}: unsupported type {path.suffix or '(none)'}; use "
                           f"{', '.join(FILE_SUFFIXES)}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with datasets

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise DatasetError(f"{path} is not a readable parquet file ({err})") from err
    return _read_json(path)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_hub(name: str, split: str) -> list[Any]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # offline mode, DNS, HTTP, missing repo: all end here
        why = ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if _hub_offline()
               else "no network, or no such dataset")
        raise DatasetError(
            f"could not load Hub dataset {name!r} split {split!r} ({why}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Use a local .json/.jsonl/.parquet file, or "
            f"'{SHIPPED}' for the shipped rows") from err
    return ds.to_list()


def _looks_like_path(spec: str) -> bool:
    # Hub dataset names are "name" or "owner/name"; anything else with a slash or a file suffix is a path.
    return spec.endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_rows(spec: str, n: int | None = None, split: str = "train") -> list[dict]:
    """Rows of ``spec`` (see the module doc), the first ``n`` when given, in a TRL format.

    ``split`` picks the GSM8K / Hub split; local files have one split.
    """
    if spec == SHIPPED:
        if split not in GSM8K_SPLITS:
            raise DatasetError(f"GSM8K ships the splits {sorted(GSM8K_SPLITS)}, not {split!r}")
        limit = min(n, GSM8K_SPLITS[split]) if n is not None else None
        return gsm8k_sft_rows(split, limit)
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec):
        rows = _read_file(path)
    else:
        rows = _read_hub(spec, split)
    return normalize_rows(rows[:n] if n is not None else rows, spec)


def split_rows(rows: list[dict], eval_rows: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the last ``eval_rows`` rows are held out; at least one row trains."""
    if eval_rows <= 0:
        return rows, []
    if eval_rows >= len(rows):
        raise DatasetError(f"cannot hold out {eval_rows} of {len(rows)} rows and still train; "
                           "lower --eval-rows")
    return rows[:-eval_rows], rows[-eval_rows:]
