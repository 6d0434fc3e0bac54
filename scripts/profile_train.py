#!/usr/bin/env python3
"""Where a real training run's sparse step loses to the dense one: per-step time by phase, our
CUDA graph captures by function, Dynamo's counters, and a host profile of each phase.

`sparse-unsloth train` on SmolLM2 through Unsloth (padding-free batches: a new token count every
step) ran its sparse steps 1.13x slower than dense (benchmarks/NOTES.md, tenth session), which
no fixed-shape speed bench shows. Each mode runs in a process of its own (Dynamo's caches and
our graphs start empty, as in a user's run), the same rows and seed:

    python scripts/profile_train.py --model smollm2 --config smollm2-135m-calibrated --unsloth \
        --steps 40 --out /tmp/profile_train

Each step is put in a phase: its first 2 ("first steps"), "dense" (the dense run), "warm-up" (the
sparse run's dense steps: the patch inactive), the first 2 sparse steps (compiling), "sparse, new
captures" and "sparse, no new captures". Odd steps are host-profiled into their phase's profile; phase times are the medians of
the even (unprofiled) steps. Writes OUT/profile_train.json and prints a short table.
"""

from __future__ import annotations

import argparse
import collections
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

    return {group: dict(values) for group, values in counters.items() if values}


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
    steps: list[dict] = []
    profiles: dict[str, pstats.Stats] = {}
    cuda = torch.cuda.is_available()

    def phase(step: int, captured: int) -> str:
        if step <= 2:
            return "first steps"
        if state is None:
            return "dense"
        if not state.enabled:
            return "warm-up"
        if sum(st["phase"].startswith("sparse") or st["phase"] == "first sparse steps" for st in steps) < 2:
            return "first sparse steps"        # compiling the sparse ops into Unsloth's blocks
        return "sparse, new captures" if captured else "sparse, no new captures"

    class Probe(TrainerCallback):
        def on_train_begin(self, a, s, c, **kw):
            # Each recompile and graph break with its reason: unsloth_zoo turns all torch logs off
            # (and drops TORCH_LOGS) when it sets up compiling, so turn them on once it has.
            torch._logging.set_logs(recompiles=True, graph_breaks=True)

        def on_step_begin(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.captured = None if state is None else state.captures_by_function()
            self.profiler = cProfile.Profile() if s.global_step % 2 == 0 else None   # odd steps (1-based)
            if self.profiler is not None:
                self.profiler.enable()
            self.start = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            if self.profiler is not None:
                self.profiler.disable()
            new = {} if state is None else dict(state.captures_by_function() - self.captured)
            name = phase(s.global_step, sum(new.values()))
            if self.profiler is not None:
                if name in profiles:
                    profiles[name].add(self.profiler)
                else:
                    profiles[name] = pstats.Stats(self.profiler)
            steps.append({"step": s.global_step, "s": seconds, "phase": name, "profiled": self.profiler is not None,
                          "captured": new, "dynamo_frames": _counters().get("frames", {}).get("total", 0)})

    rows = load_rows(args.dataset)
    trainer = build_trainer(model, tokenizer, rows, output_dir=str(Path(args.out) / args.mode), max_steps=args.steps,
                            batch_size=args.batch_size, learning_rate=2e-4, max_length=args.max_length,
                            seed=args.seed, logging_steps=args.steps, callbacks=[*callbacks, Probe()],
                            progress=False)
    trainer.train()
    tops = {}
    for name, stats in profiles.items():
        text = io.StringIO()
        stats.stream = text
        stats.sort_stats("tottime").print_stats(args.top)
        profiled = sum(1 for st in steps if st["phase"] == name and st["profiled"])
        tops[name] = [f"{profiled} profiled steps"] + text.getvalue().splitlines()[:args.top + 12]
    return {"mode": args.mode, "steps": steps, "profiles": tops, "dynamo": _counters(),
            "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None)}


def _phases(run: dict) -> dict[str, tuple[int, float | None]]:
    """phase -> (steps, median seconds of its unprofiled steps)."""
    out = {}
    for name in dict.fromkeys(st["phase"] for st in run["steps"]):
        times = [st["s"] for st in run["steps"] if st["phase"] == name and not st["profiled"]]
        out[name] = (sum(st["phase"] == name for st in run["steps"]), statistics.median(times) if times else None)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--config", default="smollm2-135m-calibrated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=10, help="dense steps of the sparse run first")
    ap.add_argument("--top", type=int, default=25, help="functions listed per phase profile")
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
              "date": datetime.date.today().isoformat(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "mode")},
              "baseline": "dense", "runs": runs}
    (out / "profile_train.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'mode':7s} {'phase':24s} {'steps':>5s} {'median s':>9s}")
    for mode, run in runs.items():
        for name, (count, median) in _phases(run).items():
            print(f"{mode:7s} {name:24s} {count:5d} {'-' if median is None else f'{median:.3f}':>9s}")
    captured = sum((collections.Counter(st["captured"]) for st in runs["sparse"]["steps"]), collections.Counter())
    print("captures by function:", dict(captured) or "none")
    for mode, run in runs.items():
        for name, top in run["profiles"].items():
            print(f"--- {mode}, {name}: host profile ({top[0]})")
            print("\n".join(top[1:]))


if __name__ == "__main__":
    main()
