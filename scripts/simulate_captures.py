#!/usr/bin/env python3
"""What the CUDA-graph runners capture, step by step, in a padding-free training run, on the CPU.

TRL's padding-free batches (Unsloth turns them on) pack a step's sequences into one row, so every
step has a new token count and dense-row count. The fast backend's bookkeeping runs here with the
CUDA steps replaced (``tests/helpers.cpu_graphs``: a graph is its body run again), on a tiny model
of SmolLM2-135M's depth (30 layers) with a preset's layer pattern, fed GSM8K rows' real token
counts (SmolLM2's tokenizer, 16 sequences a step) and random token ids. Attention calls
``apply_qkv`` / ``apply_o`` as Unsloth's does, so its sparse passes run too. The counts are the
runner's, whatever the device: in the tenth session they matched the H100 run's (3 captures a
step, 30-33 when a batch shape comes back).

    python scripts/simulate_captures.py --steps 100 --out benchmarks/results/simulate_captures_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _unsloth_like_attention() -> None:
    """Llama attention calling the two functions Unsloth's attention calls (class attributes here:
    what the backend finds as "the original" and puts back)."""
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.models.llama import modeling_llama as ml

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **_):
        b, t, _ = hidden_states.shape
        q, k, v = (x.view(b, t, -1, self.head_dim).transpose(1, 2) for x in self.apply_qkv(self, hidden_states))
        q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
        k, v = (ml.repeat_kv(x, q.shape[1] // k.shape[1]) for x in (k, v))
        # causal over the packed row: the sequences see each other, which no count depends on
        o = scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        return self.apply_o(self, o), None

    ml.LlamaAttention.apply_qkv = staticmethod(lambda self, x: (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
    ml.LlamaAttention.apply_o = staticmethod(lambda self, x: self.o_proj(x))
    ml.LlamaAttention.forward = forward


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="smollm2-135m-calibrated", help="its layer pattern, at rank 3")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sequences", type=int, default=16, help="packed sequences a step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-rows", choices=("64", "bucket"), default="64",
                    help="how the dense-row count is padded: to a multiple of 64 (the package's rule), or "
                         "as token rows are (ops.graphs.bucket: coarser, fewer batch shapes; simulated here)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import dataclasses

    import torch
    from helpers import cpu_graphs, tiny_lora_model
    from probe_setup import write_result
    from transformers import AutoTokenizer

    import sparse_unsloth as su
    from sparse_unsloth.datasets_io import load_rows
    from sparse_unsloth.ops.graphs import bucket
    from sparse_unsloth.patch import unsloth_fast
    from sparse_unsloth.smollm2 import smollm2_path

    start = time.perf_counter()
    _unsloth_like_attention()
    if args.dense_rows == "bucket":
        from sparse_unsloth.patch.state import TokenSplit

        def dense_rows(split):
            n = split.dense_idx.numel()
            return None if n == 0 else torch.cat([split.dense_idx, split.dense_idx[:1].expand(bucket(n) - n)])

        padded = functools.cached_property(dense_rows)       # once per split: the graphs key on its storage
        padded.__set_name__(TokenSplit, "dense_rows")
        TokenSplit.dense_rows = padded
    importlib.import_module("sparse_unsloth.patch.sparsify")._backend = lambda _m: unsloth_fast
    torch.manual_seed(args.seed)
    model = tiny_lora_model(layers=30, hidden=64, inter=128, heads=4, kv_heads=2, dtype=torch.float32)
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    model = su.sparsify(model, dataclasses.replace(su.load_config(args.config), estimator_rank=3), progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    runner = state._graphs = cpu_graphs(capture_at=state._graphs.capture_at)
    state.runner = lambda _t: runner
    state._layer_graphs = cpu_graphs(capture_at=state._layer_graphs.capture_at,
                                     max_buckets=state._layer_graphs.max_buckets)

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    rows = load_rows("gsm8k")
    rng = random.Random(args.seed)
    order = []                                     # epochs of the rows, each shuffled, as a trainer draws them
    while len(order) < args.sequences * args.steps:
        order += rng.sample(range(len(rows)), len(rows))
    n = args.sequences
    model.train()
    steps = []
    for step in range(args.steps):
        ids, labels, positions = [], [], []
        for row in (rows[i] for i in order[n * step:n * (step + 1)]):
            prompt = len(tok(row["prompt"])["input_ids"])
            full = len(tok(row["prompt"] + row["completion"])["input_ids"]) + 1     # + EOS
            ids += [rng.randrange(101) for _ in range(full)]
            labels += [-100] * prompt + [1] * (full - prompt)
            positions += list(range(full))
        before = state.captures_by_function()
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
              position_ids=torch.tensor([positions])).loss.backward()
        new = dict(state.captures_by_function() - before)
        steps.append({"step": step + 1, "tokens": len(ids), "token_bucket": bucket(len(ids)),
                      "dense_rows": sum(x != -100 for x in labels), "captured": new})
        print(f"step {step + 1:3d}: {len(ids)} tokens, {steps[-1]['dense_rows']} dense rows, "
              f"{sum(new.values())} captures {new or ''}", flush=True)
    total = sum((collections.Counter(s["captured"]) for s in steps), collections.Counter())
    write_result(args, "simulate_captures", (), device="cpu (CUDA steps replaced)", captured=dict(total),
                 steps=steps, seconds=round(time.perf_counter() - start, 1))
    print("captured:", dict(total))


if __name__ == "__main__":
    main()
