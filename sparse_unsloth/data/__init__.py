"""Small datasets shipped inside the package (no network needed).

GSM8K: the first 1,000 train rows and the first 300 test rows of openai/grade-school-math
(MIT license, see ``data/gsm8k/README.md``).
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["GSM8K_SPLITS", "gsm8k_prompt", "gsm8k_sft_rows", "load_gsm8k"]

#: split name -> number of rows shipped
GSM8K_SPLITS = {"train": 1000, "test": 300}


def load_gsm8k(split: str, n: int | None = None) -> list[dict]:
    """Rows ``{"question": str, "answer": str}`` of the shipped GSM8K subset, in file order.

    ``split`` is ``"train"`` (1,000 rows) or ``"test"`` (300 rows); ``n`` keeps the first ``n``
    rows (all when None). Asking for more rows than are shipped is an error.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(
            f"unknown GSM8K split {split!r}: sparse_unsloth ships {sorted(GSM8K_SPLITS)} "
            f"({', '.join(f'{k}: {v} rows' for k, v in GSM8K_SPLITS.items())})"
        )
    available = GSM8K_SPLITS[split]
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > available:
            raise ValueError(
                f"GSM8K {split!r}: asked for {n} rows but only the first {available} are shipped"
            )
    path = resources.files(__name__).joinpath("gsm8k", f"{split}.jsonl")
    rows: list[dict] = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if n is not None and len(rows) >= n:
                break
            if line.strip():
                row = json.loads(line)
                rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def gsm8k_prompt(question: str) -> str:
    """The plain prompt used for SFT and evaluation: ``"Question: ...\\nAnswer:"``."""
    return f"Question: {question.strip()}\nAnswer:"


def gsm8k_sft_rows(split: str, n: int | None = None) -> list[dict]:
    """Rows ``{"prompt": str, "completion": str}`` for TRL's prompt-completion datasets.

    ``prompt`` is ``"Question: <question>\\nAnswer:"`` and ``completion`` is ``" <answer>"`` (the
    worked solution ending in ``#### <number>``). With such a dataset ``trl.SFTTrainer`` sets the
    prompt tokens' labels to -100, so the completion tokens are the output tokens.
    Use ``datasets.Dataset.from_list(gsm8k_sft_rows("train", 200))`` to get a Dataset.
    """
    return [
        {"prompt": gsm8k_prompt(r["question"]), "completion": " " + r["answer"].strip()}
        for r in load_gsm8k(split, n)
    ]
