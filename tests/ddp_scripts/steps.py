"""Sparse training steps by hand, under DDP or as gradient accumulation in one process.

``torchrun --nproc-per-node 2 steps.py OUT ESTIMATOR`` trains each rank on its own micro-batch
of every step and saves the rank's LoRA weights; :func:`train` in the test's own process, given
all micro-batches of each step, is the one-process reference (tests/test_ddp.py).
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta

import torch
from helpers import tiny_lora_model

import sparse_unsloth as su

CONFIG = su.SparseConfig(mlp={0: 0.5, 1: 0.75}, self_attn={1: 0.5}, estimator_rank=4, dense_warmup_steps=0)
STEPS, RANKS, ROWS, SEQ, CONTEXT, VOCAB = 3, 2, 2, 16, 10, 101
NO_CALLBACK_WARNING = "sparse_unsloth: training without SparsityCallback"  # hand-written steps need none


def tiny_model() -> torch.nn.Module:
    return tiny_lora_model(layers=2, hidden=32, inter=64, heads=4, kv_heads=2, vocab=VOCAB, dtype=torch.float32)


def micro_batch(step: int, index: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` of ``step``: random tokens, the first CONTEXT of each row context."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, :CONTEXT] = -100  # every micro-batch has as many label tokens: mean of means = global mean
    return {"input_ids": ids, "labels": labels}


def train(model: torch.nn.Module, lora_of: torch.nn.Module, steps: list[list[dict]]) -> dict[str, torch.Tensor]:
    """One SGD step per entry of ``steps``, on the mean loss of its micro-batches; the LoRA weights after.

    ``model`` runs the forward passes (a DDP wrapper or the model itself); ``lora_of`` holds the weights.
    """
    opt = torch.optim.SGD([p for p in lora_of.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for batches in steps:
        for batch in batches:
            (model(**batch).loss / len(batches)).backward()
        opt.step()
        opt.zero_grad()
    return {name: p.detach().clone() for name, p in lora_of.named_parameters() if "lora_" in name}


def main(out: str, estimator: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    warnings.filterwarnings("ignore", message=NO_CALLBACK_WARNING)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = su.sparsify(tiny_model(), CONFIG, estimator, progress=False)
    weights = train(DistributedDataParallel(model), model, [[micro_batch(s, rank)] for s in range(STEPS)])
    torch.save({"lora": weights, "stats": dict(su.sparse_state(model).stats)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
