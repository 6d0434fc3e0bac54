#!/usr/bin/env python3
"""The probe loss of sparse configs on probe batches drawn as ``sparse-unsloth calibrate`` draws
them: an out-of-sample check of calibrated presets (more rows than they were calibrated on).

    python scripts/probe_configs.py --model smollm2 --rows 32 \
        --out benchmarks/results/probe_smollm2_presets_cpu.json \
        smollm2-135m-calibrated smollm2-135m-safe smollm2-135m
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="presets or YAML files")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from sparse_unsloth import calibration as cal
    from sparse_unsloth import load_config, sparsify, unsparsify
    from sparse_unsloth.datasets_io import load_rows
    from sparse_unsloth.finetune import LoraSettings, load_model

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, LoraSettings(r=16, alpha=32), progress=False)
    batches = cal.probe_batches(load_rows(args.dataset), tok, num_rows=args.rows, batch_size=args.batch_size,
                                max_length=args.max_length, seed=args.seed, device="cpu",
                                pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    increase = {}
    with cal._training_mode_without_dropout(model):
        dense = cal.probe_loss(model, batches)
        for name in args.configs:
            sparsify(model, load_config(name), progress=False)
            try:
                increase[name] = round(cal.probe_loss(model, batches) / dense - 1, 6)
            finally:
                unsparsify(model)
            print(f"{name}: {100 * increase[name]:+.2f}%", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    result = {"name": "probe_configs", "command": "python " + " ".join(sys.argv), "commit": commit,
              "device": "cpu", "date": datetime.date.today().isoformat(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "configs")},
              "dense_probe_loss": round(dense, 6), "relative_increase": increase,
              "seconds": round(time.perf_counter() - start, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
