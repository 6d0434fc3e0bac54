"""scripts/parity_calibrated.py: the ARC-Easy rows (LLM-Adapters format) parse into question, choices, gold."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from parity_calibrated import arc_item

ROW = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                      "Answer1: oxygen Answer2: carbon dioxide Answer3: helium\n\n"
                      "Answer format: answer1/answer2/answer3",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}


def test_arc_row_parses():
    assert arc_item(ROW) == ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], 1)


def test_a_gold_outside_the_choices_is_an_error():
    with pytest.raises(ValueError, match="cannot parse"):
        arc_item({**ROW, "answer": "answer5"})
