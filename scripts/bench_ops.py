#!/usr/bin/env python3
"""Micro-benchmark of the fused sparse LoRA Functions against Unsloth's dense ones (one GPU).

Llama-3-8B shapes, 8 x 512 tokens with 129 dense rows a row (128 output tokens + the shift),
FFN keeping 1% of 14336 channels, attention projections keeping 25%. For each block it times
forward + backward (CUDA-event median via triton.testing.do_bench) of: Unsloth's dense
Function, ours, and the pieces of ours (the dense-row GEMMs alone: the compute floor of the
frozen part), so the overhead of gathers / scatters is visible. Prints a table, writes JSON.

``--products`` times the frozen products alone instead (no Unsloth needed): each of the 14
per-layer products at those shapes (1024 dense rows; FFN keeping 1% and 25% of 14336; q/k/v/o
keeping 32 of 128 dims per head, GQA 32/8) three ways: the torch composition of
``ops.sparse_mm`` (``keep_cols_`` / ``keep_rows``), the fused Triton kernels of
``ops.gather_mm``, and the dense cuBLAS GEMM of the same shape; plus launches per call and the
largest difference between the two sparse versions; and the estimator's FFN channel choice,
``estimator.select`` against the fused ``ops.ffn_score``.

    python scripts/bench_ops.py [--out results.json] [--products]
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
PRODUCT_DENSE, FFN_KEEP_25 = 1024, 3584


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


def _launches(fn) -> int:
    """CUDA kernels one call of ``fn`` launches (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(ev.count for ev in prof.key_averages() if ev.device_type == DeviceType.CUDA)


def _product_specs() -> list[tuple[str, str, int, tuple[int, int], bool, int, int]]:
    """(name, product, per layer, weight [out, in], m = W.T?, kept, channels indexed) per layer.

    ``cols``: keep_cols(x, m) with x [tokens, m.shape[0]]; ``rows``: keep_rows. Forward products
    use ``m = W.T``, input gradients ``m = W``; "per layer" counts gate and up (k and v) twice.
    """
    dq, dkv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    q_kept, kv_kept = HEADS * ATTN_KEEP, KV_HEADS * ATTN_KEEP
    specs = []
    for tag, keep in (("1%", FFN_KEEP), ("25%", FFN_KEEP_25)):
        specs += [(f"ffn{tag} gate/up fwd", "cols", 2, (INTER, HID), True, keep, INTER),
                  (f"ffn{tag} down fwd", "rows", 1, (HID, INTER), True, keep, INTER),
                  (f"ffn{tag} down dX", "cols", 1, (HID, INTER), False, keep, INTER),
                  (f"ffn{tag} gate/up dX", "rows", 2, (INTER, HID), False, keep, INTER)]
    specs += [("attn q fwd", "cols", 1, (dq, HID), True, q_kept, dq),
              ("attn k/v fwd", "cols", 2, (dkv, HID), True, kv_kept, dkv),
              ("attn o fwd", "rows", 1, (HID, dq), True, q_kept, dq),
              ("attn o dX", "cols", 1, (HID, dq), False, q_kept, dq),
              ("attn q dX", "rows", 1, (dq, HID), False, q_kept, dq),
              ("attn k/v dX", "rows", 2, (dkv, HID), False, kv_kept, dkv)]
    return specs


def _product_fns(product: str, x, m, idx, dense_idx, mask, gen) -> tuple:
    """(torch composition, ours, dense, reset): callables of one product; ``reset`` restores the
    accumulated output (keep_cols adds into the LoRA output, as the callers do)."""
    from sparse_unsloth.ops import gather_mm, sparse_mm

    kept = sparse_mm.kept_channels(idx)            # padded once per Function call, as the callers do
    if product == "rows":
        return (lambda: sparse_mm.keep_rows([(x, m, kept)], dense_idx),
                lambda: gather_mm.keep_rows(x, m, idx, dense_idx, dense_mask=mask), lambda: x @ m, lambda: None)
    base = torch.randn(x.shape[0], m.shape[1], device="cuda", generator=gen).bfloat16()
    out_torch, out_ours = base.clone(), base.clone()

    def reset():
        out_torch.copy_(base)
        out_ours.copy_(base)
    return (lambda: sparse_mm.keep_cols_(out_torch, x, m, kept, dense_idx),
            lambda: gather_mm.keep_cols(x, m, idx, dense_idx, out=out_ours, dense_mask=mask), lambda: x @ m, reset)


def bench_products(gen) -> dict:
    from sparse_unsloth.ops import gather_mm

    tokens = BSZ * SEQ
    dense_idx = torch.randperm(tokens, device="cuda", generator=gen)[:PRODUCT_DENSE].sort().values
    mask = gather_mm.dense_row_mask(dense_idx, tokens, dense_idx.device)   # once per step in a caller
    rows = []
    for name, product, per_layer, (fout, fin), fwd, keep, channels in _product_specs():
        w = (torch.randn(fout, fin, device="cuda", generator=gen) / fin ** 0.5).bfloat16()
        m = w.t() if fwd else w
        x = torch.randn(tokens, m.shape[0], device="cuda", generator=gen).bfloat16()
        idx = torch.randperm(channels, device="cuda", generator=gen)[:keep].sort().values
        torch_fn, ours_fn, dense_fn, reset = _product_fns(product, x, m, idx, dense_idx, mask, gen)
        ours_fn()                                  # autotune first (it restores the output it tunes on)
        reset()
        diff = (torch_fn().float() - ours_fn().float()).abs().max().item()
        # Both sparse versions compute every row over the kept channels, the dense rows over all.
        full = m.shape[1] if product == "cols" else m.shape[0]
        row = {"name": name, "product": product, "per_layer": per_layer, "m_shape": list(m.shape),
               "m_transposed_view": fwd, "kept": keep, "dense_rows": PRODUCT_DENSE,
               "flop_fraction": round((tokens * keep + PRODUCT_DENSE * full) / (tokens * full), 4),
               "max_abs_diff": diff}
        for variant, fn in (("torch", torch_fn), ("ours", ours_fn), ("dense", dense_fn)):
            row[variant + "_ms"] = 1e3 * _bench(fn)
            row[variant + "_launches"] = _launches(fn)
        row["ours_vs_torch"] = round(row["torch_ms"] / row["ours_ms"], 3)
        row["ours_vs_dense"] = round(row["dense_ms"] / row["ours_ms"], 3)
        rows.append(row)
        print(f"{name:22} torch {row['torch_ms']:7.3f}  ours {row['ours_ms']:7.3f}  dense {row['dense_ms']:7.3f} ms",
              flush=True)
    totals = {}
    for block in ("ffn1%", "ffn25%", "attn"):
        sel = [r for r in rows if r["name"].startswith(block + " ")]
        totals[block] = {v: round(sum(r["per_layer"] * r[v + "_ms"] for r in sel), 4) for v in ("torch", "ours", "dense")}
    return {"products": rows, "per_layer_totals_ms": totals}


def bench_ffn_score(gen) -> list[dict]:
    """The estimator's FFN channel choice (rank 8, bf16 factors): select.ffn_channels vs ops.ffn_score."""
    from sparse_unsloth.estimator import select
    from sparse_unsloth.ops import ffn_score

    gate, up = [tuple((torch.randn(*s, device="cuda", generator=gen) / s[0] ** 0.5).bfloat16()
                      for s in ((HID, 8), (8, INTER))) for _ in range(2)]
    out = []
    for rows in (BSZ * SEQ - PRODUCT_DENSE, BSZ):        # context tokens, or per-sequence means
        x = torch.randn(rows, HID, device="cuda", generator=gen).bfloat16()
        fns = {"torch": lambda x=x: select.ffn_channels(x, gate, up, FFN_KEEP),
               "ours": lambda x=x: ffn_score.ffn_channels(x, gate, up, FFN_KEEP)}
        fns["ours"]()
        row = {"rows": rows, "keep": FFN_KEEP,
               "same_channels": float(torch.isin(fns["ours"](), fns["torch"]()).float().mean())}
        for variant, fn in fns.items():
            row[variant + "_ms"] = 1e3 * _bench(fn)
            row[variant + "_launches"] = _launches(fn)
        out.append(row)
    return out


def _print_products(res: dict) -> None:
    print(f"{'product':22} {'kept':>5} {'flop':>5} {'torch ms':>9} {'ours ms':>8} {'dense ms':>9} "
          f"{'vs torch':>8} {'vs dense':>8} {'launch t/o':>10} {'diff':>7}")
    for r in res["products"]:
        print(f"{r['name']:22} {r['kept']:5d} {r['flop_fraction']:5.2f} {r['torch_ms']:9.3f} {r['ours_ms']:8.3f} "
              f"{r['dense_ms']:9.3f} {r['ours_vs_torch']:8.2f} {r['ours_vs_dense']:8.2f} "
              f"{r['torch_launches']:>4d}/{r['ours_launches']:<5d} {r['max_abs_diff']:7.3f}")
    print(f"{'per layer (fwd + dX)':22} {'torch ms':>9} {'ours ms':>8} {'dense ms':>9}")
    for block, t in res["per_layer_totals_ms"].items():
        print(f"{block:22} {t['torch']:9.3f} {t['ours']:8.3f} {t['dense']:9.3f}")
    for r in res["ffn_score"]:
        print(f"{'estimator ffn ' + str(r['rows']) + ' rows':22} {r['torch_ms']:9.3f} {r['ours_ms']:8.3f} "
              f"{'':9} launches {r['torch_launches']}/{r['ours_launches']}, same channels {r['same_channels']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--products", action="store_true",
                    help="time the frozen products: torch composition vs gather_mm kernels vs dense")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(0), "commit": _commit(),
            "command": "python scripts/bench_ops.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__}
    if args.products:
        import triton

        res = {**meta, "triton": triton.__version__, "tokens": BSZ * SEQ, **bench_products(gen),
               "ffn_score": bench_ffn_score(gen)}
        _print_products(res)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return
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
