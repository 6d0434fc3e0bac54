"""The fused FFN score kernel (ops.ffn_score) against the estimator's unfused definition.

Under Triton's interpreter on CPU (16-wide tiles: several row and channel tiles, ragged edges),
on the GPU when there is one; plus a Llama-3-8B shape as a ``gpu`` test.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse_unsloth.estimator import select
from sparse_unsloth.ops.ffn_score import ffn_channels, ffn_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _factors(gen, hidden, rank, channels, dtype):
    return tuple((torch.randn(*shape, generator=gen) / shape[0] ** 0.5).to(dtype).to(DEVICE)
                 for shape in ((hidden, rank), (rank, channels)))


def _oracle(x, gate, up):
    """The estimator's score in float64 (``select.ffn_channels`` before its top-k)."""
    (g1, g2), (u1, u2) = [(a.double(), b.double()) for a, b in (gate, up)]
    x = x.double()
    return (F.silu(x @ g1 @ g2) * (x @ u1 @ u2)).norm(dim=0)


@pytest.mark.parametrize("rows,hidden,rank,channels,keep", [
    (37, 29, 8, 53, 11), (1, 24, 3, 40, 1), (8, 16, 20, 33, 33), (50, 12, 16, 17, 5)])
def test_scores_and_channels_match_the_estimator(rows, hidden, rank, channels, keep):
    gen = torch.Generator().manual_seed(rows * channels + rank)
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE)
    gate, up = _factors(gen, hidden, rank, channels, torch.float32), _factors(gen, hidden, rank, channels,
                                                                               torch.float32)
    got = ffn_scores(x, gate, up)
    assert got.dtype == torch.float32 and got.shape == (channels,)
    torch.testing.assert_close(got.cpu().double(), _oracle(x, gate, up).cpu(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ffn_channels(x, gate, up, keep).cpu(), select.ffn_channels(x, gate, up, keep).cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 32, generator=gen).to(DEVICE)
    gate, up = _factors(gen, 32, 8, 45, dtype), _factors(gen, 32, 8, 45, dtype)
    want = _oracle(x.to(dtype), gate, up).cpu()
    torch.testing.assert_close(ffn_scores(x, gate, up).cpu().double(), want, rtol=2e-2, atol=1e-2)


def test_compiles_fullgraph():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(19, 24, generator=gen).to(DEVICE)
    gate, up = _factors(gen, 24, 4, 37, torch.float32), _factors(gen, 24, 4, 37, torch.float32)
    torch._dynamo.reset()
    got = torch.compile(ffn_channels, backend="aot_eager", fullgraph=True)(x, gate, up, 9)
    assert torch.equal(got, ffn_channels(x, gate, up, 9))


def test_rejects_mismatched_factors():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=gen).to(DEVICE)
    gate, up = _factors(gen, 8, 4, 10, torch.float32), _factors(gen, 8, 5, 10, torch.float32)
    with pytest.raises(ValueError, match="alike"):
        ffn_scores(x, gate, up)


@pytest.mark.gpu
def test_gpu_llama3_8b_context_tokens():
    """3072 context rows, hidden 4096, 14336 channels, rank 8, bf16 factors: 1% kept."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3072, 4096, device="cuda", generator=gen).bfloat16()
    gate, up = [tuple((torch.randn(*s, device="cuda", generator=gen) / s[0] ** 0.5).bfloat16()
                      for s in ((4096, 8), (8, 14336))) for _ in range(2)]
    got = ffn_scores(x, gate, up)
    (g1, g2), (u1, u2) = [(a.float(), b.float()) for a, b in (gate, up)]
    want = (F.silu(x.float() @ g1 @ g2) * (x.float() @ u1 @ u2)).norm(dim=0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
    overlap = torch.isin(ffn_channels(x, gate, up, 143), torch.topk(want, 143).indices).float().mean()
    assert overlap > 0.9
