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
import sys
import time

import torch

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
        dense_grads = lora_gradients(model, batches) if args.gradients else None
        for name in args.configs:
            sparsify(model, load_config(name), progress=False)
            try:
                increase[name] = round(cal.probe_loss(model, batches) / dense - 1, 6)
                if dense_grads is not None:
                    gradients[name] = gradient_error(lora_gradients(model, batches), dense_grads)
            finally:
                unsparsify(model)
            print(f"{name}: {100 * increase[name]:+.2f}%"
                  + (f", gradient error {gradients[name]['relative_error']:.4f}" if gradients else ""), flush=True)
    write_result(args, "probe_configs", ("configs",), dense_probe_loss=round(dense, 6),
                 relative_increase=increase, **({"gradients": gradients} if gradients else {}),
                 seconds=round(time.perf_counter() - start, 1))


def lora_gradients(model, batches) -> dict[int, torch.Tensor]:
    """Per decoder layer, its LoRA parameters' gradients of the summed output-token loss, flattened."""
    from sparse_unsloth import calibration as cal
    from sparse_unsloth.patch.models import decoder_layers

    model.zero_grad(set_to_none=True)
    for batch in batches:
        cal._loss_sum(model, batch).backward()
    grads = {}
    for i, layer in enumerate(decoder_layers(model)):
        grads[i] = torch.cat([p.grad.reshape(-1) for n, p in layer.named_parameters() if "lora_" in n])
    model.zero_grad(set_to_none=True)
    return grads


def gradient_error(sparse: dict, dense: dict) -> dict:
    """Relative error ||g_s - g_d|| / ||g_d|| and cosine, over all layers and per layer."""
    s, d = torch.cat(list(sparse.values())), torch.cat(list(dense.values()))
    return {"relative_error": round(float((s - d).norm() / d.norm()), 6),
            "cosine": round(float(torch.nn.functional.cosine_similarity(s, d, dim=0)), 6),
            "per_layer_relative_error": [round(float((sparse[i] - dense[i]).norm() / dense[i].norm()), 4)
                                         for i in dense]}


if __name__ == "__main__":
    main()
