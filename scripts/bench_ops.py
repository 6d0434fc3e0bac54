#!/usr/bin/env python3
"""Micro-benchmark of the fused sparse LoRA Functions against Unsloth's dense ones (one GPU).

Llama-3-8B shapes, 8 x 512 tokens with 129 dense rows a row (128 output tokens + the shift),
FFN keeping 1% of 14336 channels, attention projections keeping 25%. For each block it times
forward + backward (CUDA-event median via triton.testing.do_bench) of: Unsloth's dense
Function, ours, and the pieces of ours (the dense-row GEMMs alone: the compute floor of the
frozen part), so the overhead of gathers / scatters is visible. Prints a table, writes JSON.

    python scripts/bench_ops.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HID, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
BSZ, SEQ, DENSE_PER_ROW, RANK = 8, 512, 129, 16
FFN_KEEP, ATTN_KEEP = 143, 32          # kept intermediate channels; kept dims per head


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def _proj(fout, fin, gen):
    from sparse_unsloth.ops.sparse_mm import LoRAProj

    w = (torch.randn(fout, fin, device="cuda", generator=gen) / fin ** 0.5).bfloat16()
    a = (torch.randn(RANK, fin, device="cuda", generator=gen) / fin ** 0.5).requires_grad_()
    b = (torch.randn(fout, RANK, device="cuda", generator=gen) / RANK ** 0.5).requires_grad_()
    return LoRAProj(w, a, b, 1.0)


def _fwd_bwd(fn, inputs, grads):
    def run():
        for t in inputs:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads)
    return run


def _kernels(run, top: int = 14) -> list:
    """GPU time of each kernel of one call (torch.profiler), the ``top`` ones, in microseconds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = [(ev.key[:90], round(ev.self_device_time_total, 1), ev.count) for ev in prof.key_averages()
            if ev.device_type == DeviceType.CUDA and ev.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:top]


def _variants(unsloth, ours, inputs, grads) -> dict:
    """Eager and torch.compile'd (as inside Unsloth's compiled blocks) fwd + bwd times."""
    out = {}
    for name, fn in (("unsloth_dense", unsloth), ("sparse", ours)):
        out[name] = _bench(_fwd_bwd(fn, inputs, grads))
        out[name + "_compiled"] = _bench(_fwd_bwd(torch.compile(fn), inputs, grads))
    out["sparse_kernels_us"] = _kernels(_fwd_bwd(ours, inputs, grads))
    out["unsloth_kernels_us"] = _kernels(_fwd_bwd(unsloth, inputs, grads))
    return out


def bench_mlp(gen, dense_idx):
    from unsloth.kernels import fast_lora
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

    from sparse_unsloth.ops.fast_mlp import sparse_lora_mlp

    x = torch.randn(BSZ, SEQ, HID, device="cuda", generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(BSZ, SEQ, HID, device="cuda", generator=gen).bfloat16()
    gate, up, down = _proj(INTER, HID, gen), _proj(INTER, HID, gen), _proj(HID, INTER, gen)
    idx = torch.randperm(INTER, device="cuda", generator=gen)[:FFN_KEEP].sort().values
    act = (lambda e, g: swiglu_fg_kernel(e.unsqueeze(0), g.unsqueeze(0)).squeeze(0), swiglu_DWf_DW_dfg_kernel)
    args = [t for p in (gate, up, down) for t in (p.weight, None, p.lora_a, p.lora_b, p.scale)]
    loras = [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]

    def unsloth():
        return fast_lora.LoRA_MLP.apply(x, *args, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, False)

    def ours():
        return sparse_lora_mlp(x, gate, up, down, idx, dense_idx, *act)

    xd = x.detach().reshape(-1, HID)[dense_idx].contiguous()
    hd = torch.randn(len(dense_idx), INTER, device="cuda", generator=gen).bfloat16()
    dyd = dy.reshape(-1, HID)[dense_idx].contiguous()

    def floor():       # the dense-row frozen GEMMs of fwd + dX alone (no LoRA, no elementwise)
        e, g = xd @ gate.weight.t(), xd @ up.weight.t()
        hd @ down.weight.t()
        dh = dyd @ down.weight
        (dh @ up.weight).addmm_(e, gate.weight)
        return g

    return {**_variants(unsloth, ours, [x, *loras], [dy]), "dense_rows_gemm_floor": _bench(floor)}


def bench_attn(gen, dense_idx):
    from unsloth.kernels import fast_lora

    from sparse_unsloth.estimator.select import kv_to_q_channels
    from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv

    dkv = KV_HEADS * HEAD_DIM
    x = torch.randn(BSZ, SEQ, HID, device="cuda", generator=gen).bfloat16().requires_grad_()
    a_in = torch.randn(BSZ, SEQ, HID, device="cuda", generator=gen).bfloat16().requires_grad_()
    q, k, v, o = _proj(HID, HID, gen), _proj(dkv, HID, gen), _proj(dkv, HID, gen), _proj(HID, HID, gen)
    grads = [torch.randn(BSZ, SEQ, c, device="cuda", generator=gen).bfloat16() for c in (HID, dkv, dkv, HID)]
    per_head = torch.stack([torch.randperm(HEAD_DIM, device="cuda", generator=gen)[:ATTN_KEEP].sort().values
                            for _ in range(KV_HEADS)])
    kv_idx = (torch.arange(KV_HEADS, device="cuda")[:, None] * HEAD_DIM + per_head).flatten()
    q_idx = kv_to_q_channels(kv_idx, HEADS, KV_HEADS, HEAD_DIM)
    loras = [t for p in (q, k, v, o) for t in (p.lora_a, p.lora_b)]
    qkv_args = [t for p in (q, k, v) for t in (p.weight, None, p.lora_a, p.lora_b, p.scale)]

    def unsloth():
        qkv = fast_lora.LoRA_QKV.apply(x, *qkv_args, False)
        return (*qkv, fast_lora.LoRA_W.apply(a_in, o.weight, None, o.lora_a, o.lora_b, o.scale))

    def ours():
        return (*sparse_lora_qkv(x, q, k, v, q_idx, kv_idx, kv_idx, dense_idx),
                sparse_lora_o(a_in, o, q_idx, dense_idx))

    return _variants(unsloth, ours, [x, a_in, *loras], grads)


def _commit() -> str:
    """HEAD, or $BENCH_COMMIT where the tree travelled without its history (the device)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(0), "commit": _commit(),
            "command": "python scripts/bench_ops.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__}
    import unsloth  # noqa: F401

    rows = torch.arange(BSZ * SEQ, device="cuda").view(BSZ, SEQ)
    dense_idx = rows[:, SEQ - DENSE_PER_ROW:].flatten()
    res = {**meta, "mlp": bench_mlp(gen, dense_idx), "attn_proj": bench_attn(gen, dense_idx)}
    for block in ("mlp", "attn_proj"):
        r = res[block]
        r["speedup"] = round(r["unsloth_dense"] / r["sparse"], 3)
        r["speedup_compiled"] = round(r["unsloth_dense_compiled"] / r["sparse_compiled"], 3)
    print(json.dumps(res, indent=1))
    print(f"{'block':10} {'mode':9} {'unsloth ms':>11} {'sparse ms':>10} {'speedup':>8}")
    for block in ("mlp", "attn_proj"):
        r = res[block]
        for mode, sfx in (("eager", ""), ("compiled", "_compiled")):
            print(f"{block:10} {mode:9} {1e3 * r['unsloth_dense' + sfx]:11.3f} {1e3 * r['sparse' + sfx]:10.3f} "
                  f"{r['speedup' + sfx]:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
