#!/usr/bin/env python3
"""How well calibrate's Taylor estimate predicts one layer's measured probe-loss increase.

For each decoder layer and module kind at one sparsity level: the estimate that orders
calibrate's greedy path (``calibration._predicted``) and the probe loss measured with only that
layer's kind sparse, on the same probe batches as ``sparse-unsloth calibrate`` would draw.
CPU-sized for SmolLM2 (~4 s a forward with 8 rows on 2 cores: ~4 min for both kinds).

    python scripts/calibration_singles.py --model smollm2 --rows 8 \
        --out benchmarks/results/calibration_singles_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    from probe_setup import add_probe_arguments, load_probe, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(ap, rows=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mlp-level", type=float, default=0.9)
    ap.add_argument("--attn-level", type=float, default=0.75)
    args = ap.parse_args(argv)

    import torch

    from sparse_unsloth import calibration as cal
    from sparse_unsloth.config import SparseConfig
    from sparse_unsloth.estimator.resolve import resolve_factors
    from sparse_unsloth.estimator.store import fingerprint
    from sparse_unsloth.patch.models import (
        attention_geometry,
        decoder_layers,
        estimated_weights,
        model_identity,
    )

    start = time.perf_counter()
    model, batches = load_probe(args)
    layers, geo = decoder_layers(model), attention_geometry(model)
    every = estimated_weights(layers, {kind: range(len(layers)) for kind in ("mlp", "self_attn")})
    model_id, revision = model_identity(model)
    factors = resolve_factors(every, args.rank, fingerprint(every), model_id=model_id, revision=revision,
                              progress=False, allow_hub=False).to("cpu", torch.float32)
    base = SparseConfig(name="single", estimator_rank=args.rank)
    items = []
    with cal._training_mode_without_dropout(model):
        dense = cal.probe_loss(model, batches)
        scores = cal._taylor_scores(model, batches, layers)
        for kind, level in (("mlp", args.mlp_level), ("self_attn", args.attn_level)):
            for layer in range(len(layers)):
                predicted = cal._predicted(scores, batches, factors, args.rank, kind, layer, level, geo,
                                           base.ffn_seq_average, dense)
                config = dataclasses.replace(base, **{kind: {layer: level}})
                cal.sparsify(model, config, factors, progress=False)
                try:
                    measured = cal.probe_loss(model, batches) / dense - 1
                finally:
                    cal.unsparsify(model)
                items.append({"kind": kind, "layer": layer, "sparsity": level,
                              "predicted": round(predicted, 6), "measured": round(measured, 6)})
                print(f"{kind:9s} {layer:3d} {level}: predicted {100 * predicted:+.3f}%, "
                      f"measured {100 * measured:+.3f}%", flush=True)
    write_result(args, "calibration_singles", (), dense_probe_loss=round(dense, 6),
                 seconds=round(time.perf_counter() - start, 1), items=items)


if __name__ == "__main__":
    main()
