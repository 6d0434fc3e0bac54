#!/usr/bin/env python3
"""How long `calibrate` takes for a Llama-3-8B shape on one GPU (issue #12 asks it be stated).

Random bf16 weights of the real shape (the speed bench's model: no weights on the device), HF
PEFT LoRA r=16 on all 7 projections, and the CLI's defaults: 16 probe rows in batches of 8,
512 tokens each with the last 128 carrying loss, budget 0.01, the default ranks and levels. The
chosen config means nothing for a random model; the wall time of each phase is the measurement.

    python scripts/time_calibrate.py --out /tmp/calib8b
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from bench_speed import ALPHA, RANK, TARGETS, VOCAB, build_model, git_commit
    from peft import LoraConfig, get_peft_model

    from sparse_unsloth.calibration import run_calibration

    t0 = time.perf_counter()
    model = build_model(tempfile.mkdtemp(), args.layers)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.rows):
        ids = torch.randint(4, VOCAB, (args.seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (args.seq - args.output_tokens) + ids[-args.output_tokens:]})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    cal = run_calibration(model, rows, 0.01, num_rows=args.rows, batch_size=8, max_length=args.seq)
    torch.cuda.synchronize()
    result = {
        "name": "calibrate_llama3-8b",
        "what": "wall time of sparse_unsloth.calibration.run_calibration on a random-weight Llama-3-8B "
                "shape (the SVD estimator factors built, not cached), CLI defaults otherwise",
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "geometry": {"layers": args.layers, "probe_rows": cal.probe_rows, "seq": args.seq,
                     "output_tokens": args.output_tokens},
        "build_model_s": round(built, 1),
        "calibrate_s": round(cal.seconds, 1),
        "measured_forwards": cal.forwards,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "calibrate_llama3-8b.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
