"""The LoRA adapter settings that the CLI, the demo and the benchmarks share.

Kept apart from :mod:`.finetune` (which imports torch, transformers and TRL) so that building the
command line's parsers imports nothing heavy.
"""

from __future__ import annotations

import dataclasses

ALL_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJS
