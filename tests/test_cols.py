"""Column gather / scatter-add kernels (ops.cols) against index_select / index_add_ along dim 1.

Under Triton's interpreter on CPU, on the GPU when there is one: odd sizes (ragged tiles),
unsorted and single indices, every column, a transposed source made contiguous by the caller.
"""

import pytest
import torch

from sparse_unsloth.ops.cols import add_cols_, gather_cols

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(37, 53, [5, 0, 52, 17]), (1, 9, [3]), (70, 200, list(range(200))), (33, 150, list(range(1, 150, 3))),
         (5, 1, [0])]


@pytest.mark.parametrize("rows,cols,idx", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gather_cols(rows, cols, idx, dtype):
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    i = torch.tensor(idx, device=DEVICE)
    got = gather_cols(x, i)
    assert got.is_contiguous() and torch.equal(got, x.index_select(1, i))


@pytest.mark.parametrize("rows,cols,idx", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_add_cols(rows, cols, idx, dtype):
    gen = torch.Generator().manual_seed(rows + cols)
    out = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    src = torch.randn(rows, len(idx), generator=gen).to(dtype).to(DEVICE)
    i = torch.tensor(idx, device=DEVICE)
    want = out.clone().index_add_(1, i, src)
    assert add_cols_(out, i, src) is out
    assert torch.equal(out, want)


def test_a_view_with_a_row_stride_and_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(12, 40, dtype=torch.float64, generator=gen).to(DEVICE)
    x = big[2:9, 5:30]                                    # rows 40 apart, columns contiguous
    i = torch.tensor([24, 0, 3], device=DEVICE)
    assert torch.equal(gather_cols(x, i), x.index_select(1, i))
    src = torch.ones(7, 3, dtype=torch.float64, device=DEVICE)
    want = big.clone()
    want[2:9, 5:30].index_add_(1, i, src)
    add_cols_(x, i, src)
    assert torch.equal(big, want)                         # only the view's columns changed
    with pytest.raises(ValueError, match="contiguous rows"):
        gather_cols(x.t(), i)
    with pytest.raises(ValueError, match="int64"):
        gather_cols(x, i.int())
    with pytest.raises(ValueError, match="src of shape"):
        add_cols_(x, i, src[:, :2])
