"""One rank's estimator fails; every rank must end with its message (tests/test_ddp.py).

``estimator_error.py GOOD_FILE BAD_FILE CACHE``, launched as 2 plain processes (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment, no agent to tear the others down):

1. the cache path, in turns: rank 0 may not build, so it fails first; rank 1 prints what it got;
2. ``sparsify`` with the good file on rank 0 and the bad one on rank 1, uncaught: both must exit.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from steps import CONFIG, tiny_model

import sparse_unsloth as su
from sparse_unsloth.estimator.resolve import resolve_factors


def main(good: str, bad: str, cache: str) -> None:
    # Longer than the test waits: ending in time shows the ranks agreed, not that a wait timed out.
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    weight = torch.randn(32, 16)
    try:
        resolve_factors({"0.gate_proj": lambda: weight}, 4, "f" * 32, model_id="tiny/ddp-error", cache_dir=cache,
                        allow_hub=False, allow_build=rank != 0, progress=False)
    except Exception as err:  # noqa: BLE001  printed for the test to read
        print(f"cache turn: {type(err).__name__}: {err}", flush=True)
    su.sparsify(tiny_model(), CONFIG, bad if rank == 1 else good, progress=False)
    print("sparsified", flush=True)  # only without the agreement: then rank 0 would go on


if __name__ == "__main__":
    main(*sys.argv[1:])
