"""Pick the channels a batch keeps, from the low-rank estimates of the frozen projections.

All scores reduce over the tokens given (the context tokens of the batch), so one channel set
serves the whole batch and the sparse GEMMs stay dense and skinny. Indices come back sorted.

Attention layout (Hugging Face, head-major): q channel ``h * head_dim + j`` belongs to query
head ``h``; k/v channel ``g * head_dim + j`` to KV head ``g``; query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)``. Each KV head keeps the same number of dims, and a kept
KV dim ``(g, j)`` keeps dim ``j`` of every query head of group ``g`` (for Q that is the dot
product's other side, for O the input channels that read V's output).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ops.topk import MAX_ROW, topk_sorted


def kept_count(channels: int, sparsity: float) -> int:
    """How many of ``channels`` survive ``sparsity`` (at least one)."""
    return max(1, round(channels * (1.0 - sparsity)))


def _low_rank(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    w1, w2 = factors
    return (x.to(w1.dtype) @ w1) @ w2


def _column_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each column over the rows, accumulated in at least float32 (no copy of ``t``)."""
    return torch.linalg.vector_norm(t, dim=0, dtype=torch.promote_types(t.dtype, torch.float32))


@dataclasses.dataclass
class _Moments:
    """What the column norms of ``Z @ w2 + b`` need of ``Z`` [rows, r]: ``Z^T Z``, the column sums
    ``Z^T 1`` and the row count (the last two only for a projection with a bias)."""
    gram: torch.Tensor
    sums: torch.Tensor | None
    rows: torch.Tensor | None

    def norms(self, w2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Column norms of ``Z @ w2 + bias`` over the rows, without forming the ``[rows, out]``
        product (an attention layer's q alone is as large as its input):
        ``||Z w2_j + b_j 1||^2 = w2_j^T (Z^T Z) w2_j + 2 b_j (Z^T 1) . w2_j + rows * b_j^2``.

        The bias matters: Qwen2's k_proj biases reach 150 in its first layers, where ``x W^T`` is of
        order 1-10, so the dims they dominate are the attention's largest, whatever ``x`` is.
        """
        w2 = w2.to(self.gram.dtype)
        squares = (w2 * (self.gram @ w2)).sum(0)
        if bias is not None:
            b = bias.to(self.gram.dtype)
            squares = squares + 2 * b * (self.sums @ w2) + self.rows * b * b
        return squares.clamp_(min=0).sqrt_()


def _moments(x: torch.Tensor, w1s: list[torch.Tensor], votes: torch.Tensor | None, biased: bool) -> list[_Moments]:
    """:class:`_Moments` of ``Z_i = x @ w1_i`` over the rows where ``votes`` is True (all without
    ``votes``), from one product over ``x``, in at least float32; the sums and count only if
    ``biased`` (a model without biases does no more work than before)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    z = (x.to(w1s[0].dtype) @ torch.cat(w1s, dim=1)).to(acc)
    if votes is not None:
        z = z.masked_fill(~votes.unsqueeze(1), 0)
    sums = rows = None
    if biased:
        sums = z.sum(0)
        # a tensor: no host sync inside a CUDA graph
        rows = votes.sum().to(acc) if votes is not None else z.new_full((), z.shape[0])
    gram, out, start = z.t() @ z, [], 0
    for w1 in w1s:
        cols = slice(start, start + w1.shape[1])
        out.append(_Moments(gram[cols, cols], None if sums is None else sums[cols], rows))
        start += w1.shape[1]
    return out


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring indices of each row, ascending: one kernel on the GPU (a third of a
    channel choice's GPU time went to ``topk`` and ``sort``), the two torch ops elsewhere and for
    rows longer than the kernel holds (the same set, up to ties)."""
    if scores.is_cuda and scores.shape[-1] <= MAX_ROW:
        return topk_sorted(scores, k)
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def ffn_channels(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor],
                 up: tuple[torch.Tensor, torch.Tensor], keep: int) -> torch.Tensor:
    """Intermediate channels with the largest L2 norm of ``silu(x Gr) * (x Ur)`` over the rows of ``x``.

    Rows are tokens, or per-sequence means of the tokens (the config's ``ffn_seq_average``).
    """
    return _top(_column_norms(F.silu(_low_rank(x, gate)) * _low_rank(x, up)), keep)


def _group_dims(kv_idx_per_head: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = torch.arange(kv_idx_per_head.shape[0], device=kv_idx_per_head.device)
    return (heads[:, None] * head_dim + kv_idx_per_head).flatten()


def kv_to_q_channels(kv_idx: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """q-space channels reading the kv-space channels ``kv_idx`` (sorted, each KV head equal)."""
    rep = num_heads // num_kv_heads
    dims = (kv_idx % head_dim).view(num_kv_heads, -1)               # [G, k]
    heads = torch.arange(num_heads, device=kv_idx.device)             # query head h in group h // rep
    return (heads[:, None] * head_dim + dims.repeat_interleave(rep, dim=0)).flatten()


def attn_channels(x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], k: tuple[torch.Tensor, torch.Tensor],
                  v: tuple[torch.Tensor, torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                  keep_per_head: int, votes: torch.Tensor | None = None,
                  biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_idx, k_idx, v_idx, o_idx) of one attention layer, from the rows of ``x`` (``votes``
    [rows]: only the rows where it is True count; ``biases``: the q, k, v projections' own).

    Q/K by the ``||q|| * ||k||`` proxy of each dim's share of the attention logits: KV dim
    ``(g, j)`` scores ``sum over heads h of group g of ||q[:, h, j]|| * ||k[:, g, j]||``. V by
    ``||v||``; O keeps the inputs that read the kept V dims. One low-rank product over ``x``
    serves all three; each estimate adds its projection's bias.
    """
    rep = num_heads // num_kv_heads
    mq, mk, mv = _moments(x, [q[0], k[0], v[0]], votes, any(b is not None for b in biases))
    q_norm = mq.norms(q[1], biases[0]).view(num_kv_heads, rep, head_dim).sum(1)
    k_norm = mk.norms(k[1], biases[1]).view(num_kv_heads, head_dim)
    k_idx = _group_dims(_top(q_norm * k_norm, keep_per_head), head_dim)
    v_idx = _group_dims(_top(mv.norms(v[1], biases[2]).view(num_kv_heads, head_dim), keep_per_head), head_dim)
    return (kv_to_q_channels(k_idx, num_heads, num_kv_heads, head_dim), k_idx, v_idx,
            kv_to_q_channels(v_idx, num_heads, num_kv_heads, head_dim))
