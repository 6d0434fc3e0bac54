import pytest
import torch

from sparse_unsloth.ops.reference import masked_linear, sparse_in_linear, sparse_out_linear


@pytest.mark.parametrize("op,dim", [(sparse_out_linear, 0), (sparse_in_linear, 1)])
@pytest.mark.parametrize("n,fin,fout,keep,dense", [(13, 17, 29, 5, 4), (7, 64, 33, 1, 0), (9, 12, 10, 12, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_equals_masked_definition(op, dim, n, fin, fout, keep, dense, bias):
    gen = torch.Generator().manual_seed(n * fin + keep)
    x = torch.randn(n, fin, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(fout, fin, dtype=torch.float64, generator=gen)
    b = torch.randn(fout, dtype=torch.float64, generator=gen) if bias else None
    idx = torch.randperm(weight.shape[dim], generator=gen)[:keep].sort().values
    dense_idx = torch.randperm(n, generator=gen)[:dense].sort().values
    grad = torch.randn(n, fout, dtype=torch.float64, generator=gen)

    out = op(x, weight, b, idx, dense_idx)
    (gx,) = torch.autograd.grad(out, x, grad)
    ref = masked_linear(x, weight, b, idx, dense_idx, dim)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,dim", [(sparse_out_linear, 0), (sparse_in_linear, 1)])
def test_all_channels_kept_is_dense(op, dim):
    x = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(6, 8, dtype=torch.float64)
    idx = torch.arange(w.shape[dim])
    torch.testing.assert_close(op(x, w, None, idx), x @ w.T, rtol=1e-13, atol=1e-13)


def test_dropped_channels_really_dropped():
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(6, 8, dtype=torch.float64)
    out = sparse_out_linear(x, w, None, torch.tensor([1, 4]))
    assert torch.all(out[:, [0, 2, 3, 5]] == 0)
    assert torch.all(out[:, [1, 4]] != 0)


def test_trainable_weight_refused():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        sparse_out_linear(torch.randn(2, 4), w, None, torch.tensor([0]))


def test_mixed_dtype_computes_in_activation_dtype():
    x = torch.randn(5, 8, dtype=torch.float32)
    w = torch.randn(6, 8, dtype=torch.float64)
    out = sparse_in_linear(x, w, None, torch.tensor([0, 3, 7]), torch.tensor([2]))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("op,dim", [(sparse_out_linear, 0), (sparse_in_linear, 1)])
def test_weight_function_is_called_in_each_pass(op, dim):
    """A 4-bit weight is given as its dequantization: called in forward and again in backward."""
    w = torch.randn(6, 8, dtype=torch.float64)
    calls = []

    def dequantize():
        calls.append(1)
        return w

    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    idx, dense_idx = torch.tensor([1, 2, 5]), torch.tensor([0, 3])
    out = op(x, dequantize, None, idx, dense_idx)
    assert len(calls) == 1
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert len(calls) == 2
    ref = masked_linear(x, w, None, idx, dense_idx, dim)
    (rx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
