"""The sorted top-k kernel (ops.topk) against torch.topk + sort.

Under Triton's interpreter on CPU (small rows), on the GPU when there is one; plus the
estimator's Llama-3-8B sizes as a ``gpu`` test.
"""

import pytest
import torch

from sparse_unsloth.ops.topk import topk_sorted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x, k, dim=-1, sorted=False).indices.sort(dim=-1).values


@pytest.mark.parametrize("shape,k", [((53,), 11), ((1,), 1), ((33,), 33), ((3, 17), 5), ((8, 128), 32),
                                     ((2, 1000), 1), ((300,), 299)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_torch_topk_on_distinct_values(shape, k, dtype):
    gen = torch.Generator().manual_seed(shape[-1] * 7 + k)
    n = shape[-1]
    # Distinct values (a permutation), signs mixed, exactly representable in every dtype.
    x = torch.stack([torch.randperm(n, generator=gen) for _ in range(int(torch.tensor(shape[:-1]).prod()))])
    x = ((x - n // 3).to(dtype)).reshape(shape).to(DEVICE)
    got = topk_sorted(x, k)
    assert got.dtype == torch.long and got.shape == (*shape[:-1], k)
    assert torch.equal(got.cpu(), _reference(x, k).cpu())


def test_ties_take_the_lowest_indices_and_exactly_k():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 3.0, -2.0], [0.0] * 7], device=DEVICE)
    got = topk_sorted(x, 3).cpu()
    assert got.tolist() == [[1, 2, 4], [0, 1, 2]]


def test_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, float("nan"), 2.0], device=DEVICE)
    # NaN ranks above +inf (torch.topk's order); -0.0 ranks below +0.0, 1e-40 (subnormal) above both.
    assert topk_sorted(x, 3).cpu().tolist() == [2, 6, 7]
    assert topk_sorted(x, 5).cpu().tolist() == [0, 2, 4, 6, 7]
    assert topk_sorted(x, 8).cpu().tolist() == list(range(8))


def test_non_contiguous_rows_and_bad_k():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen).to(DEVICE).t()         # rows with stride 1 apart: copied
    assert torch.equal(topk_sorted(x, 7).cpu(), _reference(x, 7).cpu())
    with pytest.raises(ValueError, match="between 1 and"):
        topk_sorted(x, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        topk_sorted(x, 41)
    with pytest.raises(ValueError, match="at most 65536"):
        topk_sorted(torch.zeros(65537, device=DEVICE), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_estimator_sizes_on_the_gpu():
    """The FFN choice (14,336 scores, 143 kept) and the attention choice (8 KV heads x 128 dims)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape, k in (((14336,), 143), ((8, 128), 32), ((4, 14336), 4301)):
        x = torch.rand(shape, generator=gen, device="cuda")
        assert torch.equal(topk_sorted(x, k), _reference(x, k))
