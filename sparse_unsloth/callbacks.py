"""Trainer glue: dense warm-up, then sparse; sparsity statistics in the trainer's logs."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import check_same, refuse_fsdp, sum_counters
from .patch import sparse_state
from .timing import StepClock, slower_message


class SparsityCallback(TrainerCallback):
    """Runs the first steps dense (the config's warm-up), the rest sparse, and logs statistics.

    Works with ``transformers.Trainer`` and TRL's ``SFTTrainer``::

        trainer = SFTTrainer(model=model, ..., callbacks=[SparsityCallback(model)])

    Logged keys: ``sparse/active`` (the share of training forwards since the last log that really
    ran sparse: 0 in the warm-up, and 0 where nothing could be, e.g. every token a loss token),
    ``sparse/mlp_kept_frac`` and
    ``sparse/attn_kept_frac`` (channels kept for context tokens in the sparse layers),
    ``sparse/dense_token_frac`` (output tokens computed dense), ``sparse/estimator_ms``
    (estimator wall time per forward pass, host side; logged by the reference path only: the
    Unsloth fast path makes each choice inside the CUDA graph of the pass that first uses it,
    where no host clock sees it).

    Under DDP (``torchrun`` / ``accelerate launch``) every rank sparsifies its own micro-batches;
    the statistics are summed over the ranks before the averages are taken, so each logged value
    is the global one (``sparse/estimator_ms``: the mean over every rank's forward passes), logged
    once by the main process. The warm-up switch follows ``global_step``, which the ranks share;
    ranks whose config or warm-up differ are refused at the start, as is FSDP.

    It also times the steps (CUDA events, no sync) and, once there are enough, logs
    ``sparse/step_time_vs_warmup`` (median sparse step over median dense warm-up step) and warns
    once if the sparse steps are more than 10% slower: sparsity that does not pay on this model
    and machine (``step_ratio`` keeps the last value).

    A logged loss or gradient norm that is not finite stops the training with an error: the
    adapter is lost from that step on, and every later step would only spend GPU time.
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
        self.model = model
        self.clock = StepClock()
        self.step_ratio: float | None = None
        self._warned = False

    def _device(self) -> torch.device:
        # Where the process group reduces: the model's device (CPU with gloo, the rank's GPU with NCCL).
        return next(self.model.parameters()).device

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs) -> None:
        refuse_fsdp(self.model, args)
        self.warmup_steps = self.state.config.warmup_steps(state.max_steps)
        check_same("the sparse config and dense warm-up", (self.state.config, self.warmup_steps),
                   "give every rank the same config and max_steps")
        self.state.enabled = state.global_step >= self.warmup_steps
        self.state.reset_stats()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs) -> None:
        self.state.enabled = state.global_step >= self.warmup_steps
        self._seen = self.state.sparse_batches_total
        self.clock.start(self._device())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs) -> None:
        ran_sparse = self.state.sparse_batches_total > self._seen
        self.sparse_steps += ran_sparse
        if ran_sparse or not self.state.enabled:   # an enabled step that could not be sparse is neither
            self.clock.stop(sparse=ran_sparse)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        if logs is None or "loss" not in logs:
            return              # evaluation and end-of-training summaries carry no train stats
        self._refuse_non_finite(state, logs)
        # on_log runs on every rank at the same steps (with the same logs), so all meet here.
        self.state.stats = sum_counters(self.state.stats, self._device())
        stats = self.state.pop_stats()
        self.clock.collect()
        self.step_ratio = self.clock.ratio()
        if self.step_ratio is not None:
            stats["sparse/step_time_vs_warmup"] = self.step_ratio
            message = None if self._warned else slower_message(self.clock)
            if message and state.is_world_process_zero:
                self._warned = True
                warnings.warn(f"sparse_unsloth: {message}", stacklevel=2)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def _refuse_non_finite(self, state: TrainerState, logs: dict) -> None:
        bad = {k: logs[k] for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))}
        if not bad:
            return
        found = ", ".join(f"{k} {v}" for k, v in bad.items())
        if self.state.enabled:
            cause = (f"the steps since {self.warmup_steps} ran sparse. If the dense warm-up's losses were finite "
                     "and the run's settings train densely, this is a sparse_unsloth bug: please report it with "
                     "this run's config; SPARSE_UNSLOTH_CUDA_GRAPHS=0 runs it without CUDA graphs")
        else:
            cause = "it happened in the dense warm-up, before any sparse step: lower the learning rate"
        raise FloatingPointError(f"sparse_unsloth: {found} in the logs of step {state.global_step}; the adapter's "
                                 f"weights are no longer usable, so the training stops. {cause}.")
