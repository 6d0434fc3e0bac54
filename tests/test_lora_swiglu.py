"""The LoRA-only SwiGLU channel kernels (ops.lora_swiglu) against their torch definition.

On CPU the Triton kernels run under the interpreter (conftest sets ``TRITON_INTERPRET=1``) at
odd shapes spanning several 16-wide row and channel tiles with ragged edges, ranks below,
at and above one 16-wide rank block; the oracle is the torch composition (the CPU path) in
float64. Zeroed factor rows (output tokens) and channels (kept ones) must add nothing.
"""

import pytest
import torch

from sparse_unsloth.ops import lora_swiglu as ls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _inputs(n, c, r, seed):
    gen = torch.Generator().manual_seed(seed)
    t = [torch.randn(n, r, dtype=torch.float64, generator=gen) for _ in range(3)]
    f = [torch.randn(c, r, dtype=torch.float64, generator=gen) for _ in range(3)]
    return t, f


def _rel(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("n,c,r", [(37, 53, 3), (20, 33, 16), (5, 70, 20), (1, 17, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_torch_sums(n, c, r, dtype):
    (tg, tu, td), (gb, ub, da_t) = _inputs(n, c, r, seed=n * c + r)
    want = (*ls.lora_swiglu_rows(tg, tu, gb, ub, da_t), *ls.lora_swiglu_rows(tg, tu, gb, ub, da_t, td),
            *ls.lora_swiglu_cols(tg, tu, td, gb, ub, da_t))
    cast = [t.to(DEVICE, dtype) for t in (tg, tu, td, gb, ub, da_t)]
    got = (*ls.triton_rows(*cast[:2], *cast[3:]), *ls.triton_rows(*cast[:2], *cast[3:], cast[2]),
           *ls.triton_cols(*cast))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == w.shape
        assert _rel(g, w) < TOL[dtype], (i, _rel(g, w))


def test_zeroed_rows_and_channels_add_nothing():
    (tg, tu, td), (gb, ub, da_t) = _inputs(29, 41, 5, seed=3)
    rows, chans = torch.tensor([0, 7, 28]), torch.tensor([2, 3, 40])
    t_z = [t.index_fill(0, rows, 0) for t in (tg, tu, td)]
    f_z = [f.index_fill(0, chans, 0) for f in (gb, ub, da_t)]
    keep_r = torch.ones(29, dtype=torch.bool).index_fill(0, rows, False)
    keep_c = torch.ones(41, dtype=torch.bool).index_fill(0, chans, False)
    cast = [t.to(DEVICE, torch.float32) for t in (*t_z, *f_z)]
    q, rg, ru = ls.triton_rows(*cast[:2], *cast[3:], cast[2])
    dgb, dub, ddat = ls.triton_cols(*cast)
    assert not q[rows.to(DEVICE)].any() and not rg[rows.to(DEVICE)].any() and not ru[rows.to(DEVICE)].any()
    assert not dgb[chans.to(DEVICE)].any() and not dub[chans.to(DEVICE)].any() and not ddat[chans.to(DEVICE)].any()
    # the rest: the sums over the rows and channels left in
    sub = [t[keep_r] for t in (tg, tu, td)] + [f[keep_c] for f in (gb, ub, da_t)]
    want_rows = ls.lora_swiglu_rows(*sub[:2], *sub[3:], sub[2])
    for g, w in zip((q, rg, ru), want_rows):
        assert _rel(g[keep_r.to(DEVICE)], w) < 2e-5


def test_only_the_chosen_configs_partial_sums_are_read(monkeypatch):
    """The first launch of a shape autotunes, every config writing its partial sums into the same
    buffers; a config splitting fewer ways than another leaves the other's partials behind. The
    slices past the chosen split are poisoned here: they must not reach the sums."""
    def poisoned(n, rank, like, count):
        return [torch.full((ls._MAX_SPLIT, n, rank), float("nan"), device=like.device) for _ in range(count)]
    monkeypatch.setattr(ls, "_partials", poisoned)
    (tg, tu, td), (gb, ub, da_t) = _inputs(45, 37, 4, seed=11)     # several blocks a split on each axis
    want = (*ls.lora_swiglu_rows(tg, tu, gb, ub, da_t, td), *ls.lora_swiglu_cols(tg, tu, td, gb, ub, da_t))
    cast = [t.to(DEVICE, torch.float32) for t in (tg, tu, td, gb, ub, da_t)]
    got = (*ls.triton_rows(*cast[:2], *cast[3:], cast[2]), *ls.triton_cols(*cast))
    assert ls._rows_kernel.best_config.kwargs["SPLIT"] < ls._MAX_SPLIT
    for g, w in zip(got, want):
        assert _rel(g, w) < TOL[torch.float32]


def test_rank_above_the_register_block_is_refused():
    t = torch.zeros(4, 129)
    with pytest.raises(ValueError, match="rank 129"):
        ls.triton_rows(t, t, t, t, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_llama3_8b_sizes_with_the_autotuned_split():
    """At Llama-3-8B's sizes the autotuner may split either kernel's long axis: whatever it
    picks, the sums equal the torch composition's (bf16 factors, float32 reference)."""
    (tg, tu, td), (gb, ub, da_t) = _inputs(4096, 14336, 16, seed=8)
    cast = [t.to("cuda", torch.bfloat16) for t in (tg, tu, td, gb, ub, da_t)]
    wide = [t.double().cpu() for t in cast]              # the torch composition, on the CPU
    want = (*ls.lora_swiglu_rows(*wide[:2], *wide[3:], wide[2]), *ls.lora_swiglu_cols(*wide))
    got = (*ls.triton_rows(*cast[:2], *cast[3:], cast[2]), *ls.triton_cols(*cast))
    for i, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) < TOL[torch.bfloat16], (i, _rel(g, w))
