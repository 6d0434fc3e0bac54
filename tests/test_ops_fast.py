"""The fused sparse LoRA Functions (torch ops, any device) against the masked dense definition.

float64 on the CPU: forward, input gradient and LoRA A/B gradients must match the autograd of
the dense LoRA layer whose frozen weights have the dropped channels zeroed for context rows.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv
from sparse_unsloth.ops.fast_mlp import sparse_lora_mlp
from sparse_unsloth.ops.reference import masked_linear
from sparse_unsloth.ops.sparse_mm import LoRAProj

F64 = {"rtol": 1e-10, "atol": 1e-10}


def _proj(gen, fout, fin, rank=3, dtype=torch.float64):
    w = torch.randn(fout, fin, dtype=dtype, generator=gen) / fin ** 0.5
    a = torch.randn(rank, fin, dtype=dtype, generator=gen).requires_grad_()
    b = torch.randn(fout, rank, dtype=dtype, generator=gen).requires_grad_()
    return LoRAProj(w, a, b, 0.7)


def _lora_linear(x, p: LoRAProj, idx, dense_idx, dim):
    return masked_linear(x, p.weight, None, idx, dense_idx, dim) + p.scale * (x @ p.lora_a.T) @ p.lora_b.T


def _choose(gen, n, k):
    return torch.randperm(n, generator=gen)[:k].sort().values


def _padded(idx, extra):
    """Dense rows as the patch passes them: the first one repeated (CUDA-graph buckets)."""
    return torch.cat([idx, idx[:1].expand(extra)]) if idx.numel() else idx


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("batch,seq,hidden,inter,keep,dense", [
    (2, 7, 12, 29, 3, 5), (1, 9, 16, 33, 1, 0), (3, 4, 8, 13, 13, 12), (1, 5, 10, 21, 4, 1)])
def test_mlp_matches_masked_definition(batch, seq, hidden, inter, keep, dense):
    gen = torch.Generator().manual_seed(hidden * inter + keep)
    n = batch * seq
    x = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
    gate, up, down = _proj(gen, inter, hidden), _proj(gen, inter, hidden), _proj(gen, hidden, inter)
    idx, dense_idx = _choose(gen, inter, keep), _choose(gen, n, dense)
    dy = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=gen)
    params = [x, gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b]

    out = sparse_lora_mlp(x, gate, up, down, idx, _padded(dense_idx, 3))
    got = _grads(out, params, dy)
    x2 = x.reshape(n, hidden)
    h = F.silu(_lora_linear(x2, gate, idx, dense_idx, 0)) * _lora_linear(x2, up, idx, dense_idx, 0)
    ref = _lora_linear(h, down, idx, dense_idx, 1).view(batch, seq, hidden)
    want = _grads(ref, params, dy)
    torch.testing.assert_close(out, ref, **F64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("heads,kv_heads,head_dim,keep,dense", [(4, 2, 6, 2, 3), (6, 6, 4, 1, 0), (8, 1, 3, 3, 7),
                                                             (4, 2, 8, 5, 4), (2, 2, 5, 3, 0)])   # > half kept: masked GEMMs
def test_qkv_and_o_match_masked_definition(heads, kv_heads, head_dim, keep, dense):
    gen = torch.Generator().manual_seed(heads * 31 + kv_heads * 7 + keep)
    batch, seq, hidden = 2, 5, 13
    n, dq, dkv = batch * seq, heads * head_dim, kv_heads * head_dim
    x = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
    a_in = torch.randn(batch, seq, dq, dtype=torch.float64, generator=gen, requires_grad=True)
    # Ranks differ per projection (PEFT's rank_pattern): q, k and v share their LoRA products over x.
    q, k, v = _proj(gen, dq, hidden, rank=3), _proj(gen, dkv, hidden, rank=2), _proj(gen, dkv, hidden, rank=4)
    o = _proj(gen, hidden, dq)
    q_idx, k_idx, v_idx, o_idx = (_choose(gen, dq, keep * heads), _choose(gen, dkv, keep * kv_heads),
                                  _choose(gen, dkv, keep * kv_heads), _choose(gen, dq, keep * heads))
    dense_idx = _choose(gen, n, dense)
    grads = [torch.randn(batch, seq, c, dtype=torch.float64, generator=gen) for c in (dq, dkv, dkv, hidden)]
    params = [x, a_in] + [t for p in (q, k, v, o) for t in (p.lora_a, p.lora_b)]

    outs = (*sparse_lora_qkv(x, q, k, v, q_idx, k_idx, v_idx, _padded(dense_idx, 5)),
            sparse_lora_o(a_in, o, o_idx, _padded(dense_idx, 2)))
    got = _grads(outs, params, grads)
    x2, a2 = x.reshape(n, hidden), a_in.reshape(n, dq)
    refs = [_lora_linear(x2, p, i, dense_idx, 0).view(batch, seq, -1) for p, i in ((q, q_idx), (k, k_idx), (v, v_idx))]
    refs.append(_lora_linear(a2, o, o_idx, dense_idx, 1).view(batch, seq, -1))
    want = _grads(refs, params, grads)
    for g, w in zip(outs, refs):
        torch.testing.assert_close(g, w, **F64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("keeps,dense", [((7,), 3), ((2,), 3), ((7, 2, 9), 4), ((6, 8), 0), ((9, 9), 11)])
def test_frozen_products_match_masked_definition(keeps, dense):
    """Both forms of the frozen products (skinny GEMM over the kept channels at most half kept,
    the dense product with masked context activations above), terms of both forms summed, the
    dense rows padded with a repeat."""
    from sparse_unsloth.ops.sparse_mm import keep_cols_, keep_rows, kept_channels

    gen = torch.Generator().manual_seed(sum(keeps) * 13 + dense)
    n, channels, width = 11, 9, 5
    dense_idx = _choose(gen, n, dense)
    rows_in = _padded(dense_idx, 2) if dense else None
    terms, want = [], torch.zeros(n, width, dtype=torch.float64)
    for k in keeps:
        x = torch.randn(n, channels, dtype=torch.float64, generator=gen)
        m = torch.randn(channels, width, dtype=torch.float64, generator=gen)
        idx = _choose(gen, channels, k)
        terms.append((x, m, kept_channels(idx)))
        want += masked_linear(x, m.t(), None, idx, dense_idx, 1)
    torch.testing.assert_close(keep_rows(terms, rows_in), want, **F64)

    for k in keeps:
        x = torch.randn(n, width, dtype=torch.float64, generator=gen)
        m = torch.randn(width, channels, dtype=torch.float64, generator=gen)
        out = torch.randn(n, channels, dtype=torch.float64, generator=gen)
        idx = _choose(gen, channels, k)
        want = out + masked_linear(x, m.t(), None, idx, dense_idx, 0)
        torch.testing.assert_close(keep_cols_(out, x, m, kept_channels(idx), rows_in), want, **F64)


def test_lora_params_in_float32_under_lower_precision_activations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    p = _proj(gen, 8, 8, dtype=torch.float32)
    p = LoRAProj(p.weight.bfloat16(), p.lora_a, p.lora_b, p.scale)
    out = sparse_lora_o(x, p, torch.tensor([1, 5]), torch.tensor([0, 4]))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert p.lora_a.grad.dtype == torch.float32 and p.lora_b.grad.dtype == torch.float32


@pytest.mark.parametrize("shape", [(7, 5), (1, 6), (6, 1)])
def test_kept_columns_of_a_transposed_weight_gather_its_rows(shape):
    from sparse_unsloth.ops.sparse_mm import _cols

    w = torch.randn(*shape, dtype=torch.float64)
    for m in (w, w.t()):
        idx = torch.tensor([m.shape[1] - 1, 0, m.shape[1] - 1])
        assert torch.equal(_cols(m, idx), m.index_select(1, idx))


def test_each_weight_is_dequantized_once_per_pass_that_reads_it():
    """4-bit weights come in as functions (dequantize on call). Checkpointed with
    ``out_in_recompute=False``: the forward and the backward read each weight once; the
    recompute computes nothing (the backward recomputes what it needs from the input)."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(7)
    calls = {"gate": 0, "up": 0, "down": 0}

    def counted(name, w):
        def weight():
            calls[name] += 1
            return w
        return weight

    gate, up, down = _proj(gen, 21, 10), _proj(gen, 21, 10), _proj(gen, 10, 21)
    gate, up, down = (p._replace(weight=counted(n, p.weight)) for n, p in zip(calls, (gate, up, down)))
    x = torch.randn(2, 6, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    idx, dense_idx = torch.tensor([2, 3, 9, 17]), torch.tensor([0, 5, 7])
    y = checkpoint(lambda t: sparse_lora_mlp(t, gate, up, down, idx, dense_idx, out_in_recompute=False), x,
                   use_reentrant=True)
    assert calls == {"gate": 1, "up": 1, "down": 1}
    y.square().sum().backward()
    assert calls == {"gate": 2, "up": 2, "down": 2}
