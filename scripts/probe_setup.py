"""What the CPU probe scripts share (calibration_singles.py, probe_configs.py): SmolLM2 (or another
model) with LoRA, probe batches drawn as ``sparse-unsloth calibrate`` draws them, and the result file."""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys


def add_probe_arguments(ap: argparse.ArgumentParser, rows: int) -> None:
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--rows", type=int, default=rows)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)


def load_probe(args: argparse.Namespace):
    """(LoRA model, probe batches) on the CPU, seeded as calibrate seeds them."""
    import torch

    from sparse_unsloth.calibration import probe_batches
    from sparse_unsloth.datasets_io import load_rows
    from sparse_unsloth.finetune import LoraSettings, load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, LoraSettings(r=16, alpha=32), progress=False)
    batches = probe_batches(load_rows(args.dataset), tok, num_rows=args.rows, batch_size=args.batch_size,
                            max_length=args.max_length, seed=args.seed, device="cpu",
                            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    return model, batches


def write_result(args: argparse.Namespace, name: str, skip: tuple[str, ...], **fields) -> None:
    """``args.out``: the result with its command, commit, device and date."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    result = {"name": name, "command": "python " + " ".join(sys.argv), "commit": commit, "device": "cpu",
              "date": datetime.date.today().isoformat(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", *skip)}, **fields}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
