"""The fused gather-GEMM kernels (ops.gather_mm) against the masked dense definition.

On CPU the kernels run through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) at
small odd shapes with 16-wide tiles, so every case spans several row, column and K tiles with
ragged edges. The oracle is ``ops.reference`` in float64; inputs are fp32 (or bf16/fp16,
compared at their output precision). Backward: the frozen products' input gradients are the
same kernels with the weight untransposed, checked against autograd through the reference
linears. Full Llama-3-8B shapes run as ``gpu`` tests on the device.
"""

import pytest
import torch

from sparse_unsloth.estimator.select import kv_to_q_channels
from sparse_unsloth.ops.gather_mm import dense_row_mask, keep_cols, keep_rows
from sparse_unsloth.ops.reference import masked_linear, sparse_in_linear, sparse_out_linear

# The small cases run on the GPU too when there is one (compiled kernels, autotuned tiles).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = {"rtol": 1e-5, "atol": 1e-5}
LOW = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}

# (rows N, reduction K, columns C, kept, dense rows); kept/dense None = all of them.
CASES = {
    "odd": (37, 29, 53, 11, 7),
    "single_kept": (37, 29, 53, 1, 7),
    "all_kept": (37, 29, 53, None, 7),
    "no_dense": (37, 29, 53, 11, 0),
    "all_dense": (37, 29, 53, 11, None),
    "one_row": (1, 17, 20, 3, 0),
}


def _case(name, seed, dtype=torch.float32, idx_dtype=torch.int64):
    """x [N, K], weight [C, K] (m = weight.T for keep_cols), and unsorted index sets."""
    n, k, c, kept, dense = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    w = (torch.randn(c, k, generator=gen) / k ** 0.5).to(dtype)
    kept_idx = torch.randperm(c, generator=gen)[:kept if kept is not None else c].to(idx_dtype)
    dense_idx = torch.randperm(n, generator=gen)[:dense if dense is not None else n].to(idx_dtype)
    return x, w, kept_idx, dense_idx


def _on(t):
    return t if t is None else t.to(DEVICE)


def _cols(x, m, kept_idx, dense_idx, **kw):
    """keep_cols on DEVICE, result on the CPU (``m`` keeps its strides through ``.to``)."""
    return keep_cols(_on(x), _on(m), _on(kept_idx), _on(dense_idx), **{k: _on(v) for k, v in kw.items()}).cpu()


def _rows(x, m, kept_idx, dense_idx, **kw):
    return keep_rows(_on(x), _on(m), _on(kept_idx), _on(dense_idx), **{k: _on(v) for k, v in kw.items()}).cpu()


def _oracle(x, w, kept_idx, dense_idx, dim):
    """``masked_linear`` in float64 (``dim`` 0: kept output channels, 1: kept input channels)."""
    return masked_linear(x.double(), w.double(), None, kept_idx.long(), dense_idx.long(), dim)


@pytest.mark.parametrize("name", list(CASES))
def test_keep_cols_matches_masked_output_channels(name):
    x, w, kept_idx, dense_idx = _case(name, 1)
    got = _cols(x, w.t(), kept_idx, dense_idx)
    want = _oracle(x, w, kept_idx, dense_idx, 0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **FP32)
    # a context row's dropped columns are exactly zero, not merely small
    assert torch.equal(got[want == 0], torch.zeros_like(got[want == 0]))


@pytest.mark.parametrize("name", list(CASES))
def test_keep_rows_matches_masked_input_channels(name):
    x, w, kept_idx, dense_idx = _case(name, 2)
    w_in = w.t().contiguous()              # keep_rows drops input channels: weight [out=K, in=C]
    x_in = torch.randn(x.shape[0], w_in.shape[1], generator=torch.Generator().manual_seed(3))
    got = _rows(x_in, w_in.t(), kept_idx, dense_idx)
    torch.testing.assert_close(got.double(), _oracle(x_in, w_in, kept_idx, dense_idx, 1), **FP32)


@pytest.mark.parametrize("name", ["odd", "single_kept", "all_kept", "no_dense", "all_dense"])
def test_input_gradients_are_the_other_product(name):
    """grad_x of the reference linears = the other kernel with ``m = W`` (row-major, untransposed)."""
    x, w, kept_idx, dense_idx = _case(name, 4)
    gen = torch.Generator().manual_seed(5)
    x64 = x.double().requires_grad_()
    dy_out = torch.randn(x.shape[0], w.shape[0], generator=gen)
    sparse_out_linear(x64, w.double(), None, kept_idx, dense_idx).backward(dy_out.double())
    torch.testing.assert_close(_rows(dy_out, w, kept_idx, dense_idx).double(), x64.grad, **FP32)

    w_in = w.t().contiguous()              # [K, C]: input channels C, kept_idx indexes them
    h = torch.randn(x.shape[0], w_in.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    dy_in = torch.randn(x.shape[0], w_in.shape[0], generator=gen)
    sparse_in_linear(h, w_in.double(), None, kept_idx, dense_idx).backward(dy_in.double())
    torch.testing.assert_close(_cols(dy_in, w_in, kept_idx, dense_idx).double(), h.grad, **FP32)


@pytest.mark.parametrize("op,dim", [(keep_cols, 0), (keep_rows, 1)])
def test_accumulate_adds_only_the_defined_entries(op, dim):
    """``out +=``: each entry gets its product once (dense rows x kept channels overlap in the
    tile sets), and the untouched entries of keep_cols keep their bits."""
    x, w, kept_idx, dense_idx = _case("odd", 6)
    if dim == 1:
        w = w.t().contiguous()
        x = torch.randn(x.shape[0], w.shape[1], generator=torch.Generator().manual_seed(7))
    base = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(8))
    out = _on(base.clone())
    assert op(_on(x), _on(w.t()), _on(kept_idx), _on(dense_idx), out=out) is out
    out = out.cpu()
    delta = _oracle(x, w, kept_idx, dense_idx, dim)
    torch.testing.assert_close(out.double(), base.double() + delta, **FP32)
    if dim == 0:
        assert torch.equal(out[delta == 0], base[delta == 0])


def test_caller_mask_int32_indices_and_contiguous_m():
    x, w, kept_idx, dense_idx = _case("odd", 9, idx_dtype=torch.int32)
    mask = dense_row_mask(dense_idx, x.shape[0], x.device)
    assert mask.sum() == len(dense_idx) and mask[dense_idx].all()
    want = _oracle(x, w, kept_idx, dense_idx, 0)
    for m in (w.t(), w.t().contiguous()):
        torch.testing.assert_close(_cols(x, m, kept_idx, dense_idx, dense_mask=mask).double(), want, **FP32)
    sorted_kept = kept_idx.sort().values
    torch.testing.assert_close(_cols(x, w.t(), sorted_kept, dense_idx.sort().values).double(), want, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    x, w, kept_idx, dense_idx = _case("odd", 10, dtype=dtype)
    got = _cols(x, w.t(), kept_idx, dense_idx)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), _oracle(x, w, kept_idx, dense_idx, 0), **LOW[dtype])
    h = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(13)).to(dtype)
    got = _rows(h, w, kept_idx, dense_idx)                 # m = W [C, K]: an input gradient
    torch.testing.assert_close(got.double(), _oracle(h, w.t(), kept_idx, dense_idx, 1), **LOW[dtype])


@pytest.mark.parametrize("heads,kv_heads,head_dim,keep", [(4, 2, 16, 5), (6, 1, 8, 1), (2, 2, 8, 8)])
def test_gqa_projections(heads, kv_heads, head_dim, keep):
    """q/k/v keep the same dims per KV head (q: every query head of the group), o reads q's."""
    gen = torch.Generator().manual_seed(heads * 10 + keep)
    n, hidden, dq, dkv = 21, 19, heads * head_dim, kv_heads * head_dim
    x = torch.randn(n, hidden, generator=gen)
    per_head = torch.stack([torch.randperm(head_dim, generator=gen)[:keep] for _ in range(kv_heads)])
    kv_idx = (torch.arange(kv_heads)[:, None] * head_dim + per_head).flatten()
    q_idx = kv_to_q_channels(kv_idx, heads, kv_heads, head_dim)
    dense_idx = torch.randperm(n, generator=gen)[:4]
    for fout, idx in ((dq, q_idx), (dkv, kv_idx)):
        w = torch.randn(fout, hidden, generator=gen) / hidden ** 0.5
        torch.testing.assert_close(_cols(x, w.t(), idx, dense_idx).double(),
                                   _oracle(x, w, idx, dense_idx, 0), **FP32)
    attn = torch.randn(n, dq, generator=gen)
    w_o = torch.randn(hidden, dq, generator=gen) / dq ** 0.5
    torch.testing.assert_close(_rows(attn, w_o.t(), q_idx, dense_idx).double(),
                               _oracle(attn, w_o, q_idx, dense_idx, 1), **FP32)


def test_compiles_fullgraph():
    """Both ops, fresh and in place, inside one compiled graph (no break), equal to eager."""
    x, w, kept_idx, dense_idx = (_on(t) for t in _case("odd", 11))
    mask = dense_row_mask(dense_idx, x.shape[0], x.device)

    def f(x, w, kept_idx, dense_idx, mask):
        out = torch.ones(x.shape[0], w.shape[0], device=x.device)
        e = keep_cols(x, w.t(), kept_idx, dense_idx, out=out, dense_mask=mask)
        return keep_rows(torch.sigmoid(e), w, kept_idx, dense_idx, dense_mask=mask) * 2

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, kept_idx, dense_idx, mask)
    torch.testing.assert_close(got, f(x, w, kept_idx, dense_idx, mask), rtol=0, atol=0)


def test_rejects_mismatched_operands():
    x, w, kept_idx, dense_idx = _case("odd", 12)
    with pytest.raises(ValueError, match="x \\[N, K\\]"):
        _cols(x, w, kept_idx, dense_idx)
    with pytest.raises(ValueError, match="dtype"):
        _rows(x, w.t().half(), kept_idx, dense_idx)
    with pytest.raises(ValueError, match="non-empty"):
        _cols(x, w.t(), kept_idx[:0], dense_idx)


# ---- full shapes on the device ------------------------------------------------------------------

TOKENS, HID, INTER, DENSE = 4096, 4096, 14336, 1024


def _gpu_case(fout, fin, kept, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(fout, fin, device="cuda", generator=gen) / fin ** 0.5).bfloat16()
    kept_idx = torch.randperm(fout, device="cuda", generator=gen)[:kept].sort().values
    dense_idx = torch.randperm(TOKENS, device="cuda", generator=gen)[:DENSE].sort().values
    return w, kept_idx, dense_idx


def _fp32_masked(x, m, kept_idx, dense_idx, mode):
    """fp32 product of the bf16 operands, masked (what a bf16 kernel with fp32 accumulate rounds)."""
    rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    rows[dense_idx] = True
    full = x.float() @ m.float()
    if mode == "cols":
        keep = torch.zeros(m.shape[1], dtype=torch.bool, device=x.device)
        keep[kept_idx] = True
        return torch.where(rows[:, None] | keep[None, :], full, 0.0)
    return torch.where(rows[:, None], full, x[:, kept_idx].float() @ m[kept_idx].float())


@pytest.mark.gpu
@pytest.mark.parametrize("kept", [143, 3584])
def test_gpu_llama3_8b_ffn_shapes(kept):
    gate, kept_idx, dense_idx = _gpu_case(INTER, HID, kept, 0)
    x = torch.randn(TOKENS, HID, device="cuda").bfloat16()
    dy = torch.randn(TOKENS, HID, device="cuda").bfloat16()
    h = torch.randn(TOKENS, INTER, device="cuda").bfloat16()
    down = (torch.randn(HID, INTER, device="cuda") / INTER ** 0.5).bfloat16()
    tol = {"rtol": 1.6e-2, "atol": 2e-2}
    for got, want in (
        (keep_cols(x, gate.t(), kept_idx, dense_idx), _fp32_masked(x, gate.t(), kept_idx, dense_idx, "cols")),
        (keep_rows(h, down.t(), kept_idx, dense_idx), _fp32_masked(h, down.t(), kept_idx, dense_idx, "rows")),
        (keep_cols(dy, down, kept_idx, dense_idx), _fp32_masked(dy, down, kept_idx, dense_idx, "cols")),
        (keep_rows(h, gate, kept_idx, dense_idx), _fp32_masked(h, gate, kept_idx, dense_idx, "rows")),
    ):
        torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.gpu
def test_gpu_gqa_attention_shapes_and_ieee_fp32():
    heads, kv_heads, head_dim = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    per_head = torch.stack([torch.randperm(head_dim, device="cuda", generator=gen)[:32].sort().values
                            for _ in range(kv_heads)])
    kv_idx = (torch.arange(kv_heads, device="cuda")[:, None] * head_dim + per_head).flatten()
    q_idx = kv_to_q_channels(kv_idx, heads, kv_heads, head_dim)
    _, _, dense_idx = _gpu_case(HID, HID, 1, 2)
    x = torch.randn(TOKENS, HID, device="cuda", generator=gen).bfloat16()
    for fout, idx in ((heads * head_dim, q_idx), (kv_heads * head_dim, kv_idx)):
        w = (torch.randn(fout, HID, device="cuda", generator=gen) / HID ** 0.5).bfloat16()
        torch.testing.assert_close(keep_cols(x, w.t(), idx, dense_idx).float(),
                                   _fp32_masked(x, w.t(), idx, dense_idx, "cols"), rtol=1.6e-2, atol=2e-2)
    w_o = (torch.randn(HID, heads * head_dim, device="cuda", generator=gen) / HID ** 0.5).bfloat16()
    torch.testing.assert_close(keep_rows(x, w_o.t(), q_idx, dense_idx).float(),
                               _fp32_masked(x, w_o.t(), q_idx, dense_idx, "rows"), rtol=1.6e-2, atol=2e-2)
    # fp32 operands multiply in IEEE fp32 (TF32 would miss this tolerance at K = 4096)
    xf, wf = x[:512].float(), w_o[:, :1024].float()
    got = keep_cols(xf, wf, q_idx[q_idx < 1024], dense_idx[dense_idx < 512])
    torch.testing.assert_close(got, _fp32_masked(xf, wf, q_idx[q_idx < 1024], dense_idx[dense_idx < 512], "cols"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_compiles_fullgraph_with_inductor():
    """On the GPU the ops are triton_ops: Inductor launches the kernels from its own code."""
    w, kept_idx, dense_idx = _gpu_case(INTER, HID, 143, 3)
    x = torch.randn(TOKENS, HID, device="cuda").bfloat16()
    mask = dense_row_mask(dense_idx, TOKENS, x.device)

    def f(x, w, kept_idx, dense_idx, mask):
        out = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        e = keep_cols(x, w.t(), kept_idx, dense_idx, out=out, dense_mask=mask)
        return keep_rows(torch.nn.functional.silu(e), w, kept_idx, dense_idx, dense_mask=mask)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, w, kept_idx, dense_idx, mask)
    torch.testing.assert_close(got.float(), f(x, w, kept_idx, dense_idx, mask).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real")
def test_kernels_compile_for_hopper_with_pipelined_tensor_core_loops():
    """The interpreter checks the math only: compile for sm_90 too (no GPU needed), and check that
    the GEMM K loops are software-pipelined (async copies) and run on warpgroup MMAs. (The FFN
    score's row loop, rank-16 dots over a few KB, is not pipelined: only its MMAs are checked.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("sm90_compile.py")
    env["PYTHONPATH"] = os.pathsep.join([str(script.parents[1]), env.get("PYTHONPATH", "")])
    res = json.loads(subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True,
                                    text=True, timeout=300).stdout)
    for name, kernel in res.items():
        assert kernel["wgmma"] >= 1, (name, kernel)
        assert name == "ffn_score" or kernel["async_copies"] >= 4, (name, kernel)
