#!/usr/bin/env python3
"""Where a real training run's sparse step loses to the dense one: per-step time, Dynamo's
compilations and our CUDA graph captures, and a host profile of the last steps.

`sparse-unsloth train` on SmolLM2 through Unsloth (padding-free batches: a new token count every
step) ran its sparse steps 1.56x slower than dense (benchmarks/NOTES.md, ninth session), which
no fixed-shape speed bench shows. Each mode runs in a process of its own (Dynamo's caches and
our graphs start empty, as in a user's run), the same rows and seed:

    python scripts/profile_train.py --model smollm2 --config smollm2-135m-calibrated --unsloth \
        --steps 40 --out /tmp/profile_train

Writes OUT/profile_train.json (both modes: step times, Dynamo counters and captures per step,
the top host functions of the profiled steps) and prints a short table.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if group in ("stats", "frames", "recompiles",
                                                                                  "graph_break")}


def _run_mode(args: argparse.Namespace) -> dict:
    """One training run in this process: dense, or sparse with ``args.config``."""
    if args.unsloth:
        import unsloth  # noqa: F401  (before transformers)
    import torch
    from transformers import TrainerCallback

    from sparse_unsloth import SparsityCallback, load_config, sparse_state, sparsify
    from sparse_unsloth.datasets_io import load_rows
    from sparse_unsloth.finetune import LoraSettings, build_trainer, load_model

    model, tokenizer = load_model(args.model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                                  unsloth=args.unsloth, max_length=args.max_length, seed=args.seed, progress=False)
    callbacks = []
    state = None
    if args.mode == "sparse":
        config = dataclasses.replace(load_config(args.config), dense_warmup_steps=args.warmup_steps)
        sparsify(model, config, progress=False)
        callbacks.append(SparsityCallback(model))
        state = sparse_state(model)
    steps = []
    profiler = cProfile.Profile()
    cuda = torch.cuda.is_available()

    class Probe(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            if s.global_step >= args.steps - args.profile_steps:
                profiler.enable()
            self.start = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            profiler.disable()
            steps.append({"step": s.global_step, "s": seconds, "dynamo": _counters(),
                          "captures": None if state is None else state.captures,
                          "sparse": None if state is None else bool(state.enabled)})

    rows = load_rows(args.dataset)
    trainer = build_trainer(model, tokenizer, rows, output_dir=str(Path(args.out) / args.mode), max_steps=args.steps,
                            batch_size=args.batch_size, learning_rate=2e-4, max_length=args.max_length,
                            seed=args.seed, logging_steps=args.steps, callbacks=[*callbacks, Probe()],
                            progress=False)
    trainer.train()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {"mode": args.mode, "steps": steps, "profile_top": text.getvalue().splitlines()[:60],
            "profiled_steps": args.profile_steps}


def _unique_graphs(step: dict) -> int:
    return step["dynamo"].get("stats", {}).get("unique_graphs", 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--config", default="smollm2-135m-calibrated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=3, help="dense steps of the sparse run first")
    ap.add_argument("--profile-steps", type=int, default=5, help="the last steps, host-profiled")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unsloth", action="store_true")
    ap.add_argument("--mode", choices=("dense", "sparse"), help="run this mode here (the script runs both, "
                                                                  "each in a process of its own)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode:
        (out / f"{args.mode}.json").write_text(json.dumps(_run_mode(args)) + "\n")
        return
    own = list(argv if argv is not None else sys.argv[1:])
    for mode in ("dense", "sparse"):
        subprocess.run([sys.executable, __file__, *own, "--mode", mode], check=True)
    runs = {mode: json.loads((out / f"{mode}.json").read_text()) for mode in ("dense", "sparse")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    import torch

    result = {"name": "profile_train", "command": "python " + " ".join([sys.argv[0], *own]), "commit": commit,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": datetime.date.today().isoformat(), "runs": runs}
    (out / "profile_train.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'mode':7s} {'median s (last half)':>20s} {'unique graphs':>14s} {'captures':>9s}")
    for mode, run in runs.items():
        steps = run["steps"]
        half = steps[len(steps) // 2:]
        print(f"{mode:7s} {statistics.median(s['s'] for s in half):20.3f} {_unique_graphs(steps[-1]):14d} "
              f"{steps[-1]['captures'] if steps[-1]['captures'] is not None else '-':>9}")
    for mode, run in runs.items():
        print(f"--- {mode}: host profile of the last {run['profiled_steps']} steps")
        print("\n".join(run["profile_top"][:35]))


if __name__ == "__main__":
    main()
