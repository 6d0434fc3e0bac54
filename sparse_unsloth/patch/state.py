"""Per-model and per-layer sparse state: the token split of the batch, the channel choices.

Channel choices are cached per batch, so gradient checkpointing's recompute and the backward
pass use exactly the channels the forward pass used, and the estimator runs once per batch.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ..config import SparseConfig
from ..estimator.factors import EstimatorFactors
from ..estimator.select import ffn_channels, kept_count, qk_channels, vo_channels
from .models import AttentionGeometry


@dataclasses.dataclass
class TokenSplit:
    """Rows of the flattened ``[batch * seq, hidden]`` activations that stay dense."""

    dense_idx: torch.Tensor      # rows computed with every channel (output tokens)
    sparse_idx: torch.Tensor     # context rows: the estimator scores them
    sparse_mask: torch.Tensor    # [sequences, tokens]: True at context tokens

    @property
    def num_tokens(self) -> int:
        return self.sparse_mask.numel()

    def sequence_means(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean hidden state of each sequence's context tokens; zero for a sequence without any.

        A zero row scores no channel (silu(0) * 0 = 0 under an L2 norm over rows), so it needs
        no filtering, and filtering would make the host wait for the GPU in every sparse MLP.
        A padding-free batch arrives as one flattened row, so its packed sequences share one mean.
        """
        mask = self.sparse_mask.to(hidden.dtype).unsqueeze(-1)
        x = hidden.reshape(*self.sparse_mask.shape, hidden.shape[-1])
        return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def token_split(labels: torch.Tensor | None, shape: torch.Size, device: torch.device,
                dense_output_tokens: bool = True) -> TokenSplit:
    """Output tokens dense, context tokens sparse.

    A position is an output token when its label is not -100, or when the next position's is
    (its hidden state predicts that label after the causal shift). Works from the mask alone, so
    padding side and padding-free (flattened) batches need nothing special; a boundary between
    two packed sequences at most keeps one extra row dense.
    """
    if labels is None or not dense_output_tokens:
        dense = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        if labels.numel() != shape.numel():
            raise ValueError(f"labels hold {labels.numel()} tokens but the layer sees {shape.numel()}; "
                             "the sparse patch needs labels shaped like input_ids")
        target = (labels != -100).reshape(shape).to(device)
        dense = target.clone()
        dense[..., :-1] |= target[..., 1:]
    flat = dense.reshape(-1)
    return TokenSplit(flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1), ~dense)


@dataclasses.dataclass
class MLPChoice:
    idx: torch.Tensor            # intermediate channels kept (gate/up rows, down columns)


@dataclasses.dataclass
class AttnChoice:
    q_idx: torch.Tensor
    k_idx: torch.Tensor
    v_idx: torch.Tensor
    o_idx: torch.Tensor


class SparseState:
    """Everything the patched layers share: config, factors, switch, this batch's tokens."""

    def __init__(self, config: SparseConfig, factors: EstimatorFactors, geometry: AttentionGeometry,
                 ) -> None:
        self.config = config
        self.factors = factors
        self.geometry = geometry
        self.enabled = True          # the callback turns this off for the dense warm-up
        self.training = False        # set per forward from the model's mode
        self.batch_id = 0
        self.split: TokenSplit | None = None
        self.handles: list = []      # hooks and patches to undo
        self.layers: dict[int, LayerSparsity] = {}
        self.callback_attached = False
        self._warned: set[str] = set()
        self.reset_stats()

    @property
    def active(self) -> bool:
        return self.enabled and self.training and self.split is not None

    def begin_batch(self, labels: torch.Tensor | None, shape: torch.Size, device: torch.device,
                    training: bool) -> None:
        """Start a forward pass over token ids of ``shape`` ([batch, seq])."""
        self.batch_id += 1
        self.training = training
        if not (training and self.enabled):
            self.split = None
            return
        if labels is None and self.config.dense_output_tokens:
            self._warn_once("no labels reached the model, so every token is treated as a context "
                            "token (sparse). Pass labels to keep output tokens dense.")
        if not self.callback_attached:
            self._warn_once("training without SparsityCallback: sparse from the first step, with no "
                            "dense warm-up and no statistics in the logs. Pass "
                            "callbacks=[sparse_unsloth.SparsityCallback(model)] to the trainer.")
        self.split = token_split(labels, shape, device, self.config.dense_output_tokens)
        self.stats["batches"] += 1
        self.stats["dense_tokens"] += self.split.dense_idx.numel()
        self.stats["tokens"] += self.split.num_tokens

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"sparse_unsloth: {message}", stacklevel=4)

    def reset_stats(self) -> None:
        self.stats = {"batches": 0, "dense_tokens": 0, "tokens": 0, "estimator_s": 0.0,
                      "mlp_kept": 0, "mlp_total": 0, "attn_kept": 0, "attn_total": 0}

    def pop_stats(self) -> dict[str, float]:
        """Averages since the last call, as trainer log entries."""
        s = self.stats
        out = {"sparse/active": float(self.enabled)}
        if s["batches"]:
            out["sparse/dense_token_frac"] = s["dense_tokens"] / max(s["tokens"], 1)
            out["sparse/estimator_ms"] = 1e3 * s["estimator_s"] / s["batches"]
            if s["mlp_total"]:
                out["sparse/mlp_kept_frac"] = s["mlp_kept"] / s["mlp_total"]
            if s["attn_total"]:
                out["sparse/attn_kept_frac"] = s["attn_kept"] / s["attn_total"]
        self.reset_stats()
        return out


class LayerSparsity:
    """Channel choices of one decoder layer, cached for the current batch."""

    def __init__(self, state: SparseState, layer: int) -> None:
        self.state = state
        self.layer = layer
        self.mlp_sparsity = state.config.sparsity("mlp", layer)
        self.attn_sparsity = state.config.sparsity("self_attn", layer)
        self._cache: dict[str, tuple[int, object]] = {}

    def _cached(self, kind: str, hidden: torch.Tensor, choose):
        state = self.state
        if not state.active:
            return None
        hit = self._cache.get(kind)
        if hit is not None and hit[0] == state.batch_id:
            return hit[1]
        if state.split.sparse_idx.numel() == 0:
            choice = None               # every token is an output token: nothing to skip
        else:
            start = time.perf_counter()
            # Channel choice is discrete: no gradient flows through it, and recording a graph
            # would make checkpointing's recompute (which hits the cache) save fewer tensors.
            with torch.no_grad():
                choice = choose(hidden.detach())
            state.stats["estimator_s"] += time.perf_counter() - start
        self._cache[kind] = (state.batch_id, choice)
        return choice

    def mlp_choice(self, hidden: torch.Tensor) -> MLPChoice | None:
        if not self.mlp_sparsity:
            return None
        state = self.state

        def choose(hidden: torch.Tensor) -> MLPChoice:
            split = state.split
            x = (split.sequence_means(hidden) if state.config.ffn_seq_average
                 else hidden.reshape(-1, hidden.shape[-1])[split.sparse_idx])
            gate, up = state.factors[f"{self.layer}.gate_proj"], state.factors[f"{self.layer}.up_proj"]
            total = gate[1].shape[1]
            keep = kept_count(total, self.mlp_sparsity)
            state.stats["mlp_kept"] += keep
            state.stats["mlp_total"] += total
            return MLPChoice(ffn_channels(x, gate, up, keep))

        return self._cached("mlp", hidden, choose)

    def attn_choice(self, hidden: torch.Tensor) -> AttnChoice | None:
        if not self.attn_sparsity:
            return None
        state, geo = self.state, self.state.geometry

        def choose(hidden: torch.Tensor) -> AttnChoice:
            x = hidden.reshape(-1, hidden.shape[-1])[state.split.sparse_idx]
            keep = kept_count(geo.head_dim, self.attn_sparsity)
            f = state.factors
            q_idx, k_idx = qk_channels(x, f[f"{self.layer}.q_proj"], f[f"{self.layer}.k_proj"],
                                       geo.num_heads, geo.num_kv_heads, geo.head_dim, keep)
            v_idx, o_idx = vo_channels(x, f[f"{self.layer}.v_proj"], geo.num_heads,
                                       geo.num_kv_heads, geo.head_dim, keep)
            state.stats["attn_kept"] += keep
            state.stats["attn_total"] += geo.head_dim
            return AttnChoice(q_idx, k_idx, v_idx, o_idx)

        return self._cached("attn", hidden, choose)
