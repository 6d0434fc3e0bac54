"""CUDA-graph replay of the sparse work (ops/graphs.py) against running it eagerly, on a GPU
(the runner's bookkeeping alone: tests/test_graphs_cpu.py).

A replayed graph runs the kernels that the eager call launches, so results must agree to
the bit for plain functions, and to GEMM rounding for the fused Functions (their token rows
are padded to a bucket, and cuBLAS may pick other kernels). Through Unsloth: a training step
with graphs gives the gradients of the same step without them (tests/test_gpu_fast.py).
"""

import pytest
import torch
from helpers import cuda_lora_proj as _proj
from helpers import cuda_subset as _choose

from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv
from sparse_unsloth.ops.fast_mlp import sparse_lora_mlp
from sparse_unsloth.ops.graphs import GraphRunner, run_eager

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _scaled_product(x, rows, w, s, outs=None):
    y = (x @ w).mul_(s)
    return y, y.index_select(0, rows).sum(0)


def test_replay_equals_eager_reads_parameters_fresh_and_returns_fresh_tensors():
    gen = torch.Generator(device=DEV).manual_seed(0)
    w1, w2 = (torch.randn(64, 48, device=DEV, generator=gen) for _ in range(2))
    runner = GraphRunner(capture_at=1)

    def both(x, rows, w, s):
        got = runner(_scaled_product, (x, rows), (w, s))
        want = run_eager(_scaled_product, (x, rows), (w, s))
        for g, e in zip(got, want):
            assert torch.equal(g, e)
        return got

    rows = torch.tensor([3, 0, 7], device=DEV)
    first = both(torch.randn(10, 64, device=DEV, generator=gen), rows, w1, 0.5)
    kept = first[0].clone()
    both(torch.randn(10, 64, device=DEV, generator=gen), rows, w2, 0.5)
    both(torch.randn(10, 64, device=DEV, generator=gen), rows, w1, 0.5)
    assert runner.captures == 2                # one per weight; the shapes' buffers are shared
    assert torch.equal(first[0], kept)         # a later replay did not overwrite an earlier result
    w1.add_(1.0)                               # an optimizer step, in place
    both(torch.randn(10, 64, device=DEV, generator=gen), rows, w1, 0.5)
    both(torch.randn(10, 64, device=DEV, generator=gen), rows, w1, 2.0)
    both(torch.randn(12, 64, device=DEV, generator=gen), rows, w1, 2.0)
    assert runner.captures == 4                # a new scale and a new shape, nothing else


def _doubled_in_place(x, w, outs=None):
    return (x.mul_(2) @ w,)


def test_a_function_overwriting_its_inputs_sees_them_fresh_at_every_call():
    gen = torch.Generator(device=DEV).manual_seed(2)
    w = torch.randn(16, 8, device=DEV, generator=gen)
    runner = GraphRunner(capture_at=1)
    for _ in range(3):                       # capture (after an eager warm-up), replay, replay
        x = torch.randn(4, 16, device=DEV, generator=gen)
        want = (2 * x) @ w
        (got,) = runner(_doubled_in_place, (x,), (w,))
        assert torch.equal(got, want)


def _times(x, w, outs=None):
    return (torch.mm(x, w, out=outs and outs[0]),)


def test_two_layers_in_one_checkpoint_equal_one_each():
    """Nothing passes between the replays of a layer's passes, so two layers recomputed before
    either backward (one checkpoint around both) give the gradients of one checkpoint each."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator(device=DEV).manual_seed(6)
    layers = [[_proj(gen, 300, 128), _proj(gen, 300, 128), _proj(gen, 128, 300)] for _ in range(2)]
    idx, dense_idx = _choose(gen, 300, 16), _choose(gen, 64, 8)
    runner = GraphRunner(capture_at=1)
    x = torch.randn(1, 64, 128, device=DEV, generator=gen).bfloat16().requires_grad_()
    params = [x] + [t for layer in layers for p in layer for t in (p.lora_a, p.lora_b)]

    def grads(per_region):
        def block(h, group):
            for p in group:
                h = h + sparse_lora_mlp(h, *p, idx, dense_idx, run=runner)
            return h
        h = x
        for i in range(0, 2, per_region):
            h = checkpoint(block, h, layers[i:i + per_region], use_reentrant=True)
        for p in params:
            p.grad = None
        h.float().square().sum().backward()      # (reentrant checkpointing refuses autograd.grad)
        return [p.grad.clone() for p in params]

    for _ in range(2):                                      # capture, then replay
        _close(grads(2), grads(1), "two layers per checkpoint")


def _padded(idx, extra):
    return torch.cat([idx, idx[:1].expand(extra)])


def _close(got, want, label):
    # The graphs pad the token rows to a bucket (602 -> 640 here): cuBLAS may pick other kernels
    # and sum in another order, a bf16 rounding difference; a wrong replay is off by O(1).
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w) or _rel(g, w) < 5e-3, f"{label}[{i}]: rel {_rel(g, w):.2e}"


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "nf4"])
def test_fused_mlp_graphed_equals_eager(quantized):
    import bitsandbytes.functional as bnbf

    from sparse_unsloth.patch.models import Dequantize
    from sparse_unsloth.patch.unsloth_fast import _unsloth_swiglu_backward, _unsloth_swiglu_forward

    gen = torch.Generator(device=DEV).manual_seed(2)
    hidden, inter, n = 1024, 2811, 2 * 301
    projs = []
    for fout, fin in ((inter, hidden), (inter, hidden), (hidden, inter)):
        p = _proj(gen, fout, fin)
        if quantized:
            packed, state = bnbf.quantize_4bit(p.weight, quant_type="nf4", compress_statistics=True)
            packed.quant_state = state
            p = p._replace(weight=Dequantize(packed))
        projs.append(p)
    idx, dense_idx = _choose(gen, inter, 29), _padded(_choose(gen, n, 77), 51)
    runner = GraphRunner(capture_at=1)
    loras = [t for p in projs for t in (p.lora_a, p.lora_b)]
    results = []
    for run in (run_eager, runner, runner):          # the second graphed call replays
        g2 = torch.Generator(device=DEV).manual_seed(3)
        x = torch.randn(2, 301, hidden, device=DEV, generator=g2).bfloat16().requires_grad_()
        dy = torch.randn(2, 301, hidden, device=DEV, generator=g2).bfloat16()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sparse_lora_mlp(x, *projs, idx, dense_idx, _unsloth_swiglu_forward, _unsloth_swiglu_backward,
                                  run=run)
        results.append([out, *torch.autograd.grad(out, [x, *loras], dy)])
    assert runner.captures == 2                      # forward and backward, each once
    _close(results[1], results[0], "graphed")
    _close(results[2], results[0], "replayed")


def test_fused_attention_graphed_equals_eager():
    from sparse_unsloth.estimator.select import kv_to_q_channels

    gen = torch.Generator(device=DEV).manual_seed(4)
    heads, kv_heads, head_dim, batch, seq = 14, 2, 64, 2, 203
    hidden, dq, dkv, n = heads * head_dim, heads * head_dim, kv_heads * head_dim, batch * seq
    q, k, v = (_proj(gen, c, hidden, bias=True) for c in (dq, dkv, dkv))
    o = _proj(gen, hidden, dq)
    per_head = torch.stack([_choose(gen, head_dim, 21) for _ in range(kv_heads)])
    kv_idx = (torch.arange(kv_heads, device=DEV)[:, None] * head_dim + per_head).flatten()
    q_idx = kv_to_q_channels(kv_idx, heads, kv_heads, head_dim)
    dense_idx = _padded(_choose(gen, n, 90), 38)
    params = [t for p in (q, k, v, o) for t in (p.lora_a, p.lora_b)] + [p.bias for p in (q, k, v)]
    runner = GraphRunner(capture_at=1)
    results = []
    for run in (run_eager, runner, runner):
        g2 = torch.Generator(device=DEV).manual_seed(5)
        x = torch.randn(batch, seq, hidden, device=DEV, generator=g2).bfloat16().requires_grad_()
        a_in = torch.randn(batch, seq, dq, device=DEV, generator=g2).bfloat16().requires_grad_()
        grads = [torch.randn(batch, seq, c, device=DEV, generator=g2).bfloat16() for c in (dq, dkv, dkv, hidden)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = (*sparse_lora_qkv(x, q, k, v, q_idx, kv_idx, kv_idx, dense_idx, run=run),
                    sparse_lora_o(a_in, o, q_idx, dense_idx, run=run))
        results.append([*outs, *torch.autograd.grad(outs, [x, a_in, *params], grads)])
    assert runner.captures == 4
    _close(results[1], results[0], "graphed")
    _close(results[2], results[0], "replayed")
