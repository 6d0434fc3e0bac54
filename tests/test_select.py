import pytest
import torch
import torch.nn.functional as F

from sparse_unsloth.estimator.factors import svd_factors
from sparse_unsloth.estimator.select import (
    attn_channels,
    ffn_channels,
    kept_count,
    kv_to_q_channels,
)


def _factors(out, inp, gen):
    return svd_factors(torch.randn(out, inp, dtype=torch.float64, generator=gen), rank=min(out, inp))


def test_full_rank_svd_reproduces_the_weight():
    w = torch.randn(11, 7, dtype=torch.float64)
    w1, w2 = svd_factors(w, 7)
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(x @ w1 @ w2, x @ w.T, rtol=1e-4, atol=1e-5)  # the SVD runs in fp32


def test_rank_above_weight_size_refused():
    with pytest.raises(ValueError, match="estimator rank"):
        svd_factors(torch.randn(4, 6), 5)


def test_ffn_channels_brute_force():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(19, 10, dtype=torch.float64, generator=gen)
    gate, up = _factors(23, 10, gen), _factors(23, 10, gen)
    idx = ffn_channels(x, gate, up, 6)
    act = F.silu(x @ gate[0] @ gate[1]) * (x @ up[0] @ up[1])
    scores = [act[:, c].norm() for c in range(23)]
    expected = sorted(sorted(range(23), key=lambda c: -scores[c])[:6])
    assert idx.tolist() == expected


@pytest.mark.parametrize("heads,kv_heads,head_dim,keep", [(6, 2, 5, 2), (4, 4, 8, 3), (8, 1, 4, 1), (9, 3, 6, 5)])
@pytest.mark.parametrize("with_biases", [False, True])
def test_gqa_channels_brute_force(heads, kv_heads, head_dim, keep, with_biases):
    """Explicit loops over heads (HF layout: q head h reads KV head h // (heads // kv_heads));
    with biases (Qwen2), the norms are those of ``x W^T + b``."""
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    hidden = 12
    x = torch.randn(15, hidden, dtype=torch.float64, generator=gen)
    qf, kf, vf = (_factors(heads * head_dim, hidden, gen), _factors(kv_heads * head_dim, hidden, gen),
                  _factors(kv_heads * head_dim, hidden, gen))
    # biases of the size of the products, a few far larger (as Qwen2's first layers' k biases)
    biases = tuple((3 * torch.randn(f[1].shape[1], dtype=torch.float64, generator=gen)
                    * (1 + 20 * (torch.rand(f[1].shape[1], generator=gen) < 0.2))) if with_biases else None
                   for f in (qf, kf, vf))
    q, k, v = (x @ f[0] @ f[1] + (0 if b is None else b) for f, b in zip((qf, kf, vf), biases))
    group = heads // kv_heads
    exp_k, exp_q, exp_v, exp_o = [], [], [], []
    for g in range(kv_heads):
        qk = {j: sum(q[:, h * head_dim + j].norm() for h in range(heads) if h // group == g)
              * k[:, g * head_dim + j].norm() for j in range(head_dim)}
        vv = {j: v[:, g * head_dim + j].norm() for j in range(head_dim)}
        exp_k += [g * head_dim + j for j in sorted(sorted(qk, key=lambda j: -qk[j])[:keep])]
        exp_v += [g * head_dim + j for j in sorted(sorted(vv, key=lambda j: -vv[j])[:keep])]
    for h in range(heads):
        g = h // group
        exp_q += [h * head_dim + (c - g * head_dim) for c in exp_k if c // head_dim == g]
        exp_o += [h * head_dim + (c - g * head_dim) for c in exp_v if c // head_dim == g]
    q_idx, k_idx, v_idx, o_idx = attn_channels(x, qf, kf, vf, heads, kv_heads, head_dim, keep, biases=biases)
    assert k_idx.tolist() == exp_k and q_idx.tolist() == exp_q
    assert v_idx.tolist() == exp_v and o_idx.tolist() == exp_o
    # rows that do not vote count for nothing: the same as leaving them out (biases included)
    votes = torch.arange(x.shape[0]) % 3 != 1
    masked = attn_channels(x, qf, kf, vf, heads, kv_heads, head_dim, keep, votes, biases)
    for got, want in zip(masked, attn_channels(x[votes], qf, kf, vf, heads, kv_heads, head_dim, keep,
                                               biases=biases)):
        assert torch.equal(got, want)


def test_kv_to_q_matches_repeat_kv_layout():
    """The q-space channels are exactly the kept kv channels after HF's repeat_kv."""
    heads, kv_heads, head_dim = 6, 2, 4
    kv_idx = torch.tensor([1, 3, 4, 6])                  # 2 dims of each KV head
    mask = torch.zeros(kv_heads * head_dim, dtype=torch.bool)
    mask[kv_idx] = True
    repeated = mask.view(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim).reshape(-1)
    assert kv_to_q_channels(kv_idx, heads, kv_heads, head_dim).tolist() == repeated.nonzero().flatten().tolist()


def test_kept_count():
    assert [kept_count(14336, 0.99), kept_count(128, 0.75), kept_count(10, 0.999)] == [143, 32, 1]
    assert [kept_count(n, 0.0) for n in (1, 7, 100)] == [1, 7, 100]


@pytest.mark.parametrize("rows,hidden,out,rank", [(17, 12, 30, 5), (1, 7, 9, 1), (64, 16, 40, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_moment_norms_equal_the_norms_of_the_formed_product(rows, hidden, out, rank, with_bias):
    """The attention scores' column norms come from rank x rank Gram matrices and column sums,
    never from ``x @ w1 @ w2 + b`` itself; rows that do not vote count for nothing."""
    from sparse_unsloth.estimator.select import _moments

    gen = torch.Generator().manual_seed(rows + out)
    x = torch.randn(rows, hidden, dtype=torch.float64, generator=gen)
    x[::3] = 0
    votes = torch.arange(rows) % 4 != 2
    pairs = [(torch.randn(hidden, r, dtype=torch.float64, generator=gen),
              torch.randn(r, out + r, dtype=torch.float64, generator=gen)) for r in (rank, rank + 2)]
    biases = [5 * torch.randn(w2.shape[1], dtype=torch.float64, generator=gen) if with_bias else None
              for _, w2 in pairs]
    for counted, rows_counted in ((votes, x[votes]), (None, x)):
        moments = _moments(x, [w1 for w1, _ in pairs], counted, with_bias)
        for m, (w1, w2), b in zip(moments, pairs, biases):
            want = (rows_counted @ w1 @ w2 + (0 if b is None else b)).norm(dim=0)
            torch.testing.assert_close(m.norms(w2, b), want, rtol=1e-10, atol=1e-12)
    # bf16 activations, factors and bias (the GPU path): accumulated in float32, close to float64
    (m,) = _moments(x.bfloat16(), [pairs[0][0].bfloat16()], votes, with_bias)
    b = None if biases[0] is None else biases[0].bfloat16()
    got = m.norms(pairs[0][1].bfloat16(), b)
    want = (x[votes] @ pairs[0][0] @ pairs[0][1] + (0 if b is None else b.double())).norm(dim=0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.max().item())
