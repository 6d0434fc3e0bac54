"""``sparse-unsloth train``: one LoRA fine-tune, dense or sparse, from the shell.

Inputs are checked before the model's weights load (the config against the model's config.json,
the dataset), and every mistake a user can make (a bad path, an unknown preset, a malformed
dataset, a model that cannot be loaded) ends with exit code 2 and one line on stderr
(:mod:`.cli`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_args import (
    DENSE,
    add_lora_arguments,
    add_model_arguments,
    checked_config,
    import_unsloth_first,
    lora_settings,
    non_negative_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the top-level subparsers."""
    p = sub.add_parser(
        "train", help="LoRA fine-tune a model with TRL's SFTTrainer, sparse or dense",
        description="LoRA fine-tune with TRL's SFTTrainer. The config makes it sparse (SparseLoRA: context "
                    "tokens use a fraction of the frozen weights' channels) or 'dense'. Saves the adapter "
                    "to OUTPUT_DIR/adapter (loads with peft.PeftModel.from_pretrained) and a summary to "
                    "OUTPUT_DIR/summary.json.")
    add_model_arguments(p, dense_allowed=True)
    add_lora_arguments(p)
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default: %(default)s)")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="rows per step (default: %(default)s)")
    run.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant (default: %(default)s)")
    run.add_argument("--max-length", type=positive_int, default=512,
                     help="tokens per row, longer rows are cut (default: %(default)s)")
    run.add_argument("--train-rows", type=positive_int, help="use only the first N rows (default: all)")
    run.add_argument("--eval-rows", type=non_negative_int, default=16,
                     help="held-out rows for the final loss: the gsm8k test split, else the dataset's last "
                          "N rows (default: %(default)s; 0: none)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of LoRA init and data order (default: %(default)s)")
    run.add_argument("--logging-steps", type=positive_int, default=10,
                     help="log every N steps (default: %(default)s)")
    run.add_argument("--output-dir", default="outputs/sparse-unsloth-run",
                     help="where the adapter and summary go (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    gpu = p.add_argument_group("GPU")
    gpu.add_argument("--unsloth", action="store_true",
                     help="load with Unsloth's FastLanguageModel (needs a CUDA GPU): the fused fast path")
    gpu.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base weights (with --unsloth)")
    p.set_defaults(func=cmd_train)


def _rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    from .datasets_io import SHIPPED, load_rows, split_rows

    rows = load_rows(args.dataset, args.train_rows)
    if args.dataset == SHIPPED:  # GSM8K has a real test split: hold that out
        return rows, load_rows(SHIPPED, args.eval_rows, split="test") if args.eval_rows else []
    return split_rows(rows, args.eval_rows)


def cmd_train(args: argparse.Namespace) -> int:
    """Run the fine-tune and write OUTPUT_DIR/summary.json."""
    import_unsloth_first(args)
    from .finetune import SHIPPED_MODEL, finetune, load_model, resolve_model

    if args.model != SHIPPED_MODEL:
        resolve_model(args.model)  # a mistyped path first; the shipped model is converted only when loaded
    config = checked_config(args, dense_allowed=True)
    train, held_out = _rows(args)
    model, tokenizer = load_model(args.model, lora_settings(args), unsloth=args.unsloth,
                                  load_in_4bit=args.load_in_4bit, max_length=args.max_length, seed=args.seed,
                                  progress=not args.no_progress)
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
        from .timing import SLOWER_LIMIT

        ratio = kept.get("sparse/step_time_vs_warmup")
        if ratio is not None:
            lines.append(f"  speed:    a sparse step took {ratio:.2f}x the time of a dense warm-up step (medians)"
                         + (": SLOWER, sparsity does not pay here (see the warning above)" if ratio > SLOWER_LIMIT
                            else ""))
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
