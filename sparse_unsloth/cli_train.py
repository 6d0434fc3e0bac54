"""``sparse-unsloth train``: one LoRA fine-tune, dense or sparse, from the shell.

Inputs are checked before the model is loaded (config, dataset), and every mistake a user can
make (a bad path, an unknown preset, a malformed dataset, a model that cannot be loaded) ends
with exit code 2 and one line on stderr, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .finetune import ALL_PROJS, SHIPPED_MODEL

DENSE = "dense"
# Loading a YAML with an "all" layer key needs the layer count; a count no model reaches checks the
# file's syntax and values before the model is loaded (sparsify checks it again with the real count).
_ANY_DEPTH = 4096


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the top-level subparsers."""
    p = sub.add_parser(
        "train", help="LoRA fine-tune a model with TRL's SFTTrainer, sparse or dense",
        description="LoRA fine-tune with TRL's SFTTrainer. The config makes it sparse (SparseLoRA: context "
                    "tokens use a fraction of the frozen weights' channels) or 'dense'. Saves the adapter "
                    "to OUTPUT_DIR/adapter (loads with peft.PeftModel.from_pretrained) and a summary to "
                    "OUTPUT_DIR/summary.json.")
    p.add_argument("--model", default=SHIPPED_MODEL, metavar="PATH_OR_ID",
                   help=f"local model folder, Hugging Face model id, or '{SHIPPED_MODEL}' (the shipped "
                        "SmolLM2-135M-Instruct, offline) (default: %(default)s)")
    p.add_argument("--dataset", default="gsm8k", metavar="PATH_OR_NAME",
                   help="local .json/.jsonl/.parquet with prompt+completion, question+answer, messages or "
                        "text columns; 'gsm8k' (the shipped 1,000 train / 300 test rows); or a Hub dataset "
                        "'name[:config]' (default: %(default)s)")
    p.add_argument("--config", metavar="PRESET_OR_YAML",
                   help=f"sparsity preset, YAML path, or '{DENSE}' (default: smollm2-135m for --model "
                        f"{SHIPPED_MODEL}, required otherwise)")
    p.add_argument("--estimator", metavar="FILE_OR_REPO",
                   help="estimator file or Hub repo (default: cache, then Hub, else built from the weights)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank (default: %(default)s)")
    lora.add_argument("--lora-alpha", type=_positive, help="LoRA alpha (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    lora.add_argument("--target-modules", default=",".join(ALL_PROJS), metavar="NAMES",
                      help="comma-separated projections to adapt (default: all seven)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=_positive, default=100, help="optimizer steps (default: %(default)s)")
    run.add_argument("--batch-size", type=_positive, default=8, help="rows per step (default: %(default)s)")
    run.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant (default: %(default)s)")
    run.add_argument("--max-length", type=_positive, default=512,
                     help="tokens per row, longer rows are cut (default: %(default)s)")
    run.add_argument("--train-rows", type=_positive, help="use only the first N rows (default: all)")
    run.add_argument("--eval-rows", type=_non_negative, default=16,
                     help="held-out rows for the final loss: the gsm8k test split, else the dataset's last "
                          "N rows (default: %(default)s; 0: none)")
    run.add_argument("--seed", type=int, default=0, help="seed of LoRA init and data order (default: %(default)s)")
    run.add_argument("--logging-steps", type=_positive, default=10, help="log every N steps (default: %(default)s)")
    run.add_argument("--output-dir", default="outputs/sparse-unsloth-run", help="where the adapter and summary go "
                                                                       "(default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    gpu = p.add_argument_group("GPU")
    gpu.add_argument("--unsloth", action="store_true",
                     help="load with Unsloth's FastLanguageModel (needs a CUDA GPU): the fused fast path")
    gpu.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base weights (with --unsloth)")
    p.set_defaults(func=cmd_train)


def _user_errors() -> tuple[type[Exception], ...]:
    from .config import ConfigError
    from .datasets_io import DatasetError
    from .estimator import EstimatorFileError
    from .finetune import ModelSourceError
    from .patch.models import UnsupportedModelError

    # NotImplementedError: sparsify refuses what the fast path cannot take (an Unsloth model off the GPU).
    return ConfigError, DatasetError, EstimatorFileError, ModelSourceError, UnsupportedModelError, \
        FileNotFoundError, NotImplementedError


def cmd_train(args: argparse.Namespace) -> int:
    """Run the fine-tune; user mistakes print one line and return 2."""
    try:
        return _train(args)
    except _user_errors() as err:
        if getattr(args, "verbose", False):
            raise
        print(f"sparse-unsloth train: error: {err}", file=sys.stderr)
        return 2


def _config(args: argparse.Namespace) -> str | None:
    from .config import ConfigError, load_config

    config = args.config or ("smollm2-135m" if args.model == SHIPPED_MODEL else None)
    if config is None:
        raise ConfigError(f"--config is required for --model {args.model}: a preset, a YAML path, or '{DENSE}'")
    if config == DENSE:
        return None
    load_config(config, num_layers=_ANY_DEPTH)
    return config


def _rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    from .datasets_io import SHIPPED, load_rows, split_rows

    rows = load_rows(args.dataset, args.train_rows)
    if args.dataset == SHIPPED:  # GSM8K has a real test split: hold that out
        return rows, load_rows(SHIPPED, args.eval_rows, split="test") if args.eval_rows else []
    return split_rows(rows, args.eval_rows)


def _train(args: argparse.Namespace) -> int:
    import torch

    if args.unsloth and torch.cuda.is_available():
        import unsloth  # noqa: F401  Unsloth patches transformers/peft/trl, so it comes before them

    from .finetune import LoraSettings, finetune, load_model, resolve_model

    if args.model != SHIPPED_MODEL:
        resolve_model(args.model)  # a mistyped path first; the shipped model is converted only when loaded
    config = _config(args)
    train, held_out = _rows(args)
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r, dropout=args.lora_dropout,
                        target_modules=targets)
    model, tokenizer = load_model(args.model, lora, unsloth=args.unsloth, load_in_4bit=args.load_in_4bit,
                                  max_length=args.max_length, seed=args.seed, progress=not args.no_progress)
    result = finetune(model, tokenizer, train, output_dir=args.output_dir, sparse=config,
                      eval_rows=held_out or None, max_steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.lr, max_length=args.max_length, seed=args.seed,
                      logging_steps=args.logging_steps, estimator=args.estimator,
                      progress=not args.no_progress)
    summary = {"model": args.model, "dataset": args.dataset, "config": config or DENSE,
               "train_rows": len(train), "eval_rows": len(held_out), **result.to_dict()}
    path = Path(args.output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(result, len(held_out)) + f"\n  summary:  {path}")
    return 0


def format_summary(result, eval_rows: int) -> str:
    """A few human lines about a :class:`~sparse_unsloth.finetune.FinetuneResult`."""
    warmup = result.warmup_steps
    lines = [(f"trained {result.steps} steps in {result.train_s:.1f} s "
              f"(median {result.median_step_s():.2f} s/step, {result.tokens_per_s:.0f} tokens/s)")]
    if result.sparse_steps:
        kept = result.sparse_logs[-1] if result.sparse_logs else {}
        detail = ", ".join(f"{label} {100 * kept[key]:.0f}%" for key, label in
                           (("sparse/mlp_kept_frac", "MLP"), ("sparse/attn_kept_frac", "attention"))
                           if key in kept)
        lines.append(f"  sparse:   {result.sparse_steps} of {result.steps} steps "
                     f"({100 * result.sparse_steps / result.steps:.0f}%) after {warmup} dense warm-up steps, "
                     f"median {result.median_step_s(warmup):.2f} s/step"
                     + (f"; channels kept for context tokens: {detail}" if detail else ""))
    elif result.sparse:
        lines.append(f"  sparse:   0 of {result.steps} steps ran sparse after {warmup} dense warm-up steps: "
                     "no batch had context tokens (tokens without a label), so every token was computed "
                     "dense. Use prompt/completion rows.")
    else:
        lines.append("  sparse:   0 steps (dense run)")
    if result.losses:
        lines.append(f"  loss:     {result.losses[0][1]:.4f} (step {result.losses[0][0]}) -> "
                     f"{result.losses[-1][1]:.4f} (step {result.losses[-1][0]})")
    if result.eval_loss is not None:
        lines.append(f"  held-out: loss {result.eval_loss:.4f} on {eval_rows} rows (computed dense)")
    if result.adapter_dir:
        lines.append(f"  adapter:  {result.adapter_dir}  (peft.PeftModel.from_pretrained(base, this folder))")
    return "\n".join(lines)
