#!/usr/bin/env python3
"""The probe loss of sparse configs on probe batches drawn as ``sparse-unsloth calibrate`` draws
them: an out-of-sample check of calibrated presets (more rows than they were calibrated on).

    python scripts/probe_configs.py --model smollm2 --rows 32 \
        --out benchmarks/results/probe_smollm2_presets_cpu.json \
        smollm2-135m-calibrated smollm2-135m-safe smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    from probe_setup import add_probe_arguments, load_probe, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="presets or YAML files")
    add_probe_arguments(ap, rows=32)
    args = ap.parse_args(argv)

    from sparse_unsloth import calibration as cal
    from sparse_unsloth import load_config, sparsify, unsparsify

    start = time.perf_counter()
    model, batches = load_probe(args)
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
    write_result(args, "probe_configs", ("configs",), dense_probe_loss=round(dense, 6),
                 relative_increase=increase, seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
