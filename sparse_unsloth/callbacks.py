"""Trainer glue: dense warm-up, then sparse; sparsity statistics in the trainer's logs."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .patch import sparse_state


class SparsityCallback(TrainerCallback):
    """Runs the first steps dense (the config's warm-up), the rest sparse, and logs statistics.

    Works with ``transformers.Trainer`` and TRL's ``SFTTrainer``::

        trainer = SFTTrainer(model=model, ..., callbacks=[SparsityCallback(model)])

    Logged keys: ``sparse/active`` (the share of training forwards since the last log that really
    ran sparse: 0 in the warm-up, and 0 where nothing could be, e.g. every token a loss token),
    ``sparse/mlp_kept_frac`` and
    ``sparse/attn_kept_frac`` (channels kept for context tokens in the sparse layers),
    ``sparse/dense_token_frac`` (output tokens computed dense), ``sparse/estimator_ms``
    (estimator wall time per forward pass, host side).
    """

    def __init__(self, model: nn.Module) -> None:
        self.state = sparse_state(model)
        if self.state is None:
            raise ValueError("SparsityCallback needs a sparsified model: call "
                             "sparse_unsloth.sparsify(model, config) first")
        self.state.callback_attached = True
        self.warmup_steps = 0
        self.sparse_steps = 0        # optimizer steps in which some layer really ran sparse
        self._seen = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs) -> None:
        self.warmup_steps = self.state.config.warmup_steps(state.max_steps)
        self.state.enabled = state.global_step >= self.warmup_steps
        self.state.reset_stats()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs) -> None:
        self.state.enabled = state.global_step >= self.warmup_steps
        self._seen = self.state.sparse_batches_total

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs) -> None:
        self.sparse_steps += self.state.sparse_batches_total > self._seen

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        if logs is None or "loss" not in logs:
            return              # evaluation and end-of-training summaries carry no train stats
        stats = self.state.pop_stats()
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
