"""torch.distributed glue: whether this is one of several ranks, counters summed over the ranks,
one rank's error raised on every rank, and the refusal of FSDP.

Each helper does nothing (or the single-process thing) outside a process group, so the same
code runs under ``python``, ``torchrun`` and ``accelerate launch``. The collectives use the
default process group, so a rank waits for the others at most that group's timeout
(``init_process_group(timeout=...)``; under the HF Trainer ``TrainingArguments.ddp_timeout``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Another rank failed in a step all ranks take together; the message carries its error."""


def is_distributed() -> bool:
    """True in a process group of more than one rank.

    Raises when this process was launched as one of several (``WORLD_SIZE`` > 1) but the process
    group is not up yet: the ranks could neither share one estimator nor agree on errors.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        raise RuntimeError(
            f"this process is one of {launched} (WORLD_SIZE={launched}, from torchrun / accelerate launch) "
            "but torch.distributed is not initialized yet, so the ranks cannot share one estimator. "
            "Create the SFTConfig / TrainingArguments before calling sparsify (its constructor starts "
            "the process group), or call torch.distributed.init_process_group() first")
    return False


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gather(value: Any) -> list[Any]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def first_on_node() -> bool:
    """Whether this rank has the lowest rank on its host (every rank must call it together).

    Host names, not ``LOCAL_RANK``: ``torch.multiprocessing`` and hand-made launches set no
    ``LOCAL_RANK``, and the ranks of one host are the ones that share its disk.
    """
    if not is_distributed():
        return True
    hosts = _gather(socket.gethostname())
    return hosts.index(hosts[dist.get_rank()]) == dist.get_rank()


def in_turns(work: Callable[[], T], turn: int, turns: int) -> T:
    """``work()`` on this rank in turn ``turn`` of ``0 .. turns - 1``; a failure on any rank ends all.

    The ranks of turn ``t`` start once every rank of the earlier turns has finished, so they can
    read what those wrote (the estimator cache). After each turn the ranks exchange their errors:
    the failing rank raises its own exception, every other rank a :class:`RankFailedError` with
    its message, where a barrier would leave them waiting for a rank that is gone.
    """
    if not is_distributed():
        return work()
    result: T | None = None
    for t in range(turns):
        error: Exception | None = None
        if t == turn:
            try:
                result = work()
            except Exception as err:  # noqa: BLE001  any error must reach the other ranks
                error = err
        failures = _gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [f"rank {r} failed: {message}" for r, message in enumerate(failures) if message is not None]
        if failed:
            raise RankFailedError("; ".join(failed))
    return result


def check_same(what: str, value: Any, fix: str) -> None:
    """Raise on every rank when the ranks hold different ``value`` s (all must call it together)."""
    if not is_distributed():
        return
    values = _gather(value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in
                                                                          enumerate(values)) + f"; {fix}")


def sum_counters(counters: Mapping[str, int | float], device: torch.device) -> dict[str, int | float]:
    """``counters`` summed over the ranks (every rank must call it at the same point).

    ``device``: one the process group's backend reduces on (the model's: CPU for gloo, the
    rank's GPU for NCCL). Integer counters come back as integers.
    """
    if not is_distributed():
        return dict(counters)
    keys = sorted(counters)  # every rank sends the same order
    total = torch.tensor([float(counters[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {k: round(v) if isinstance(counters[k], int) else v for k, v in zip(keys, total.tolist())}


def _fsdp_types() -> tuple[type, ...]:
    if not dist.is_available():
        return ()
    from torch.distributed import fsdp

    # FSDP1 wraps modules in FullyShardedDataParallel; FSDP2's fully_shard makes them FSDPModules.
    found = (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
    return tuple(t for t in found if t is not None)


def refuse_fsdp(model: nn.Module | None = None, args: Any = None) -> None:
    """Raise when FSDP shards (or is set to shard) the model: the sparse path is DDP only.

    The sparse layers index rows and columns of whole frozen weights and the estimator reads
    them whole, while FSDP leaves each rank a shard; this is not supported, rather than risking
    silently wrong training. ``args``: the trainer's ``TrainingArguments``, if any.
    """
    found = []
    if args is not None and getattr(args, "fsdp", None):
        found.append(f"TrainingArguments.fsdp={args.fsdp!r}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        found.append("ACCELERATE_USE_FSDP=true (accelerate launch --use_fsdp or an FSDP accelerate config)")
    types = _fsdp_types()
    if model is not None and types and any(isinstance(m, types) for m in model.modules()):
        found.append("the model is wrapped in FSDP")
    if found:
        raise NotImplementedError(
            "sparse_unsloth does not support FSDP (" + "; ".join(found) + "): its sparse layers need each "
            "rank to hold whole frozen weights. Train with DDP instead: `accelerate launch --multi_gpu "
            "--num_processes N` or `torchrun --nproc-per-node N`, without --use_fsdp / fsdp=")
