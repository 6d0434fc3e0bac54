#!/usr/bin/env python3
"""The probe loss of sparse configs on probe batches drawn as ``sparse-unsloth calibrate`` draws
them: an out-of-sample check of calibrated presets (more rows than they were calibrated on).

With ``--gradients``, also how far each config's LoRA gradients (summed over the probe batches,
at the adapter's initialisation) are from the dense model's: relative error and cosine, overall
and per decoder layer. The sparse forward's loss does not rank configs by the accuracy trained
under them (benchmarks/NOTES.md, tenth session); the gradient the adapter learns from might.

    python scripts/probe_configs.py --model smollm2 --rows 32 \
        --out benchmarks/results/probe_smollm2_presets_cpu.json \
        smollm2-135m-calibrated smollm2-135m-safe smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    from probe_setup import add_probe_arguments, load_probe, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="presets or YAML files")
    ap.add_argument("--gradients", action="store_true", help="also compare the LoRA gradients with dense's")
    add_probe_arguments(ap, rows=32)
    args = ap.parse_args(argv)

    from sparse_unsloth import calibration as cal
    from sparse_unsloth import load_config, sparsify, unsparsify

    start = time.perf_counter()
    model, batches = load_probe(args)
    increase, gradients = {}, {}
    with cal._training_mode_without_dropout(model):
        dense = cal.probe_loss(model, batches)
        dense_grads = cal.lora_gradients(model, batches) if args.gradients else None
        for name in args.configs:
            sparsify(model, load_config(name), progress=False)
            try:
                increase[name] = round(cal.probe_loss(model, batches) / dense - 1, 6)
                if dense_grads is not None:
                    gradients[name] = gradient_errors(cal.lora_gradients(model, batches), dense_grads)
            finally:
                unsparsify(model)
            print(f"{name}: {100 * increase[name]:+.2f}%"
                  + (f", gradient error {gradients[name]['relative_error']:.4f}" if gradients else ""), flush=True)
    write_result(args, "probe_configs", ("configs",), dense_probe_loss=round(dense, 6),
                 relative_increase=increase, **({"gradients": gradients} if gradients else {}),
                 seconds=round(time.perf_counter() - start, 1))


def gradient_errors(sparse: dict, dense: dict) -> dict:
    """calibration.gradient_error overall and per decoder layer, and the overall cosine."""
    from sparse_unsloth import calibration as cal

    layers: dict[int, list[str]] = {}
    for name in dense:
        layers.setdefault(int(re.search(r"\.layers\.(\d+)\.", name).group(1)), []).append(name)
    dot = sum(float((sparse[n] * g).sum()) for n, g in dense.items())
    norms = [sum(float(t[n].square().sum()) for n in dense) ** 0.5 for t in (sparse, dense)]
    return {"relative_error": round(cal.gradient_error(sparse, dense), 6),
            "cosine": round(dot / (norms[0] * norms[1]), 6),
            "per_layer_relative_error": [round(cal.gradient_error({n: sparse[n] for n in names},
                                                                  {n: dense[n] for n in names}), 4)
                                         for _, names in sorted(layers.items())]}


if __name__ == "__main__":
    main()
