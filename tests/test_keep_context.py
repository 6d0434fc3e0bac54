"""The context-mask kernel (ops.keep_context) against its definition.

Under Triton's interpreter on CPU (tests/conftest.py sets it), on the GPU when there is one;
plus Llama-3-8B's attention sizes as a ``gpu`` test.
"""

import pytest
import torch

from sparse_unsloth.ops.keep_context import keep_context

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _definition(src, kept_idx, dense_idx):
    keep = torch.zeros(src.shape, dtype=torch.bool)
    keep[:, kept_idx.cpu()] = True
    if dense_idx is not None:
        keep[dense_idx.cpu()] = True
    return torch.where(keep.to(src.device), src, torch.zeros((), dtype=src.dtype, device=src.device))


def _subset(gen, n, k):
    return torch.randperm(n, generator=gen)[:k].sort().values


@pytest.mark.parametrize("n,c,kept,dense", [(37, 150, 100, 5), (1, 1, 1, 0), (33, 129, 129, 0), (5, 7, 1, 5),
                                            (64, 256, 200, 64), (70, 3, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masks_context_rows_and_adds_into_out(n, c, kept, dense, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + c + kept)
    src = torch.randn(n, c, generator=gen).to(dtype).to(DEVICE)
    kept_idx = _subset(gen, c, kept).to(DEVICE)
    dense_idx = _subset(gen, n, dense)
    dense_idx = torch.cat([dense_idx, dense_idx[:1].expand(3)]).to(DEVICE) if dense else None   # padded repeats
    want = _definition(src, kept_idx, dense_idx)
    assert torch.equal(keep_context(src, kept_idx, dense_idx), want)

    out = torch.randn(n, c, generator=gen).to(dtype).to(DEVICE)
    expected = (out.double() + want.double()).to(dtype)            # 16-bit: summed wide, rounded once
    got = keep_context(src, kept_idx, dense_idx, out=out)
    assert got is out
    # Triton's interpreter truncates float32 to bfloat16 where the GPU rounds to nearest even: one
    # unit in the last place apart on the CPU, equal on the GPU.
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.0
    torch.testing.assert_close(got, expected, rtol=ulp, atol=0)


def test_transposed_source_and_bad_out():
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(9, 20, generator=gen, dtype=torch.float64).to(DEVICE).t()     # rows not contiguous
    kept_idx, dense_idx = torch.tensor([0, 4, 8], device=DEVICE), torch.tensor([19], device=DEVICE)
    assert torch.equal(keep_context(src, kept_idx, dense_idx), _definition(src, kept_idx, dense_idx))
    with pytest.raises(ValueError, match="same shape and dtype, and contiguous rows"):
        keep_context(src, kept_idx, dense_idx, out=torch.zeros(9, 20, dtype=torch.float64, device=DEVICE).t())
    with pytest.raises(ValueError, match="2-D"):
        keep_context(src.reshape(-1), kept_idx, dense_idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_llama3_8b_attention_sizes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, c = 4096, 4096
    src = torch.randn(n, c, device="cuda", generator=gen).bfloat16()
    kept_idx = torch.randperm(c, device="cuda", generator=gen)[:int(0.8 * c)].sort().values
    dense_idx = torch.randperm(n, device="cuda", generator=gen)[:1024].sort().values
    want = _definition(src, kept_idx, dense_idx)
    assert torch.equal(keep_context(src, kept_idx, dense_idx), want)
    out = torch.randn(n, c, device="cuda", generator=gen).bfloat16()
    expected = (out.float() + want.float()).bfloat16()
    assert torch.equal(keep_context(src, kept_idx, dense_idx, out=out), expected)
