"""``sparse-unsloth calibrate``: a sparse config for a model from a few batches of its training data.

Writes an ordinary config YAML whose header says how it was made (model, data, budget, date,
what was measured) and prints the FLOP fraction it keeps, so a user sees the saving before
training. Mistakes (bad budget, path, dataset) end with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_args import CommandError
from .smollm2 import SHIPPED_MODEL


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), e.g. 0.01 for 1%; got {text}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    return tuple(_fraction(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` to the top-level subparsers."""
    from .config import CALIBRATION_LEVELS, CALIBRATION_RANKS

    p = sub.add_parser(
        "calibrate", help="make a sparse config for a model from a few batches of your data",
        description="Measure how much each layer's MLP and attention can be sparsified on a few batches of "
                    "your data (one forward + backward, then a handful of sparse forwards), and write the "
                    "config that saves the most training FLOPs while the loss of the sparse forward on "
                    "those batches stays within BUDGET of dense.")
    p.add_argument("--model", default=SHIPPED_MODEL, metavar="PATH_OR_ID",
                   help=f"local model folder, Hugging Face model id, or '{SHIPPED_MODEL}' (default: %(default)s)")
    p.add_argument("--dataset", default="gsm8k", metavar="PATH_OR_NAME",
                   help="training rows as for `sparse-unsloth train` (default: %(default)s)")
    p.add_argument("--budget", type=_fraction, default=0.01,
                   help="allowed relative increase of the probe loss, e.g. 0.01 = 1%% (default: %(default)s)")
    p.add_argument("--gradient-budget", type=_fraction, metavar="FRACTION",
                   help="also bound the relative error of the LoRA gradient on the probe rows against dense, "
                        "e.g. 0.25 (each search step then costs a forward and a backward; default: not measured)")
    p.add_argument("--out", required=True, metavar="YAML", help="where to write the config")
    p.add_argument("--name", help="the config's name (default: the --out file's stem)")
    p.add_argument("--rows", type=int, default=16, help="probe rows drawn from the dataset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per probe batch; use your training batch size (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (default: %(default)s)")
    p.add_argument("--ranks", type=_ints, default=CALIBRATION_RANKS, metavar="R,R,...",
                   help=f"candidate estimator ranks (default: {','.join(map(str, CALIBRATION_RANKS))})")
    p.add_argument("--mlp-levels", type=_floats, default=CALIBRATION_LEVELS["mlp"], metavar="S,S,...",
                   help=f"MLP sparsities tried (default: {','.join(map(str, CALIBRATION_LEVELS['mlp']))})")
    p.add_argument("--attn-levels", type=_floats, default=CALIBRATION_LEVELS["self_attn"], metavar="S,S,...",
                   help="attention sparsities tried (default: "
                        f"{','.join(map(str, CALIBRATION_LEVELS['self_attn']))})")
    p.add_argument("--search-steps", type=int, default=6,
                   help="measured sparse forwards of the search (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the FLOP count (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which rows are drawn (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate and write ``--out``; mistakes reach the CLI's one-line errors (exit 2)."""
    from .calibration import run_calibration
    from .config import config_to_yaml
    from .datasets_io import load_rows
    from .finetune import LoraSettings, load_model, resolve_model

    if args.model != SHIPPED_MODEL:
        resolve_model(args.model)  # a mistyped path before the data is read
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: folder {out.parent} does not exist; create it or name another")
    rows = load_rows(args.dataset)
    model, tokenizer = load_model(args.model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                                  progress=not args.no_progress)
    cal = run_calibration(model, rows, args.budget, tokenizer=tokenizer, num_rows=args.rows,
                          batch_size=args.batch_size, max_length=args.max_length, ranks=args.ranks,
                          levels={"mlp": args.mlp_levels, "self_attn": args.attn_levels},
                          search_steps=args.search_steps, name=args.name or out.stem, seed=args.seed,
                          gradient_budget=args.gradient_budget, progress=not args.no_progress)
    batch, seq, outputs = cal.geometry
    bounded = "" if cal.gradient_budget is None else f", LoRA gradient error at most {cal.gradient_budget:g}"
    how = (f"made by `sparse-unsloth calibrate` on {cal.date}: budget {args.budget:g} (probe loss at most "
           f"{100 * args.budget:g}% above dense{bounded}), model {args.model}, {cal.probe_rows} rows of "
           f"{args.dataset} (seed {args.seed}, {cal.probe_tokens} tokens, batches of {args.batch_size})")
    gradient = "" if cal.gradient_error is None else f", LoRA gradient error {cal.gradient_error:.3f}"
    header = "\n".join([
        how + ".",
        (f"Probe loss: dense {cal.dense_loss:.4f}, this config {cal.sparse_loss:.4f} "
        f"({100 * cal.loss_increase:+.2f}%){gradient}; {cal.forwards} measured forwards, "
        f"{cal.seconds / 60:.1f} min."),
        (f"Keeps {cal.flop_fraction:.3f} of the training FLOPs at batch {batch} x {seq} tokens with {outputs} "
        f"output tokens a row (sparse_unsloth.flop_fraction, LoRA r {args.lora_r})."),
        (f"Command: sparse-unsloth calibrate --model {args.model} --dataset {args.dataset} --budget {args.budget:g} "
        f"--rows {args.rows} --batch-size {args.batch_size} --max-length {args.max_length} "
        f"--ranks {','.join(map(str, args.ranks))} --mlp-levels {','.join(map(str, args.mlp_levels))} "
        f"--attn-levels {','.join(map(str, args.attn_levels))} --search-steps {args.search_steps} "
        f"--seed {args.seed}"
        + ("" if args.gradient_budget is None else f" --gradient-budget {args.gradient_budget:g}")
        + f" --out {out.name}"),
        "Parity: not yet measured (train dense and with this config, same seed and steps: scripts/parity_calibrated.py).",
    ])
    out.write_text(config_to_yaml(cal.config, header=header, description=how))
    kinds = ", ".join(f"{kind} sparse in {len(getattr(cal.config, kind))} layers"
                      for kind in ("mlp", "self_attn") if getattr(cal.config, kind)) or "dense (nothing fit)"
    print(f"calibrated {out}: {kinds}, estimator rank {cal.config.estimator_rank}\n"
          f"  probe loss: dense {cal.dense_loss:.4f} -> sparse {cal.sparse_loss:.4f} "
          f"({100 * cal.loss_increase:+.2f}%, budget {100 * args.budget:g}%)\n"
          + ("" if cal.gradient_error is None else
             f"  LoRA gradient error: {cal.gradient_error:.3f} (budget {cal.gradient_budget:g})\n") +
          f"  flop_fraction: {cal.flop_fraction:.3f} at {batch} x {seq} tokens, {outputs} output tokens "
          f"(bound {1 / cal.flop_fraction:.2f}x)\n"
          f"  took {cal.seconds:.0f} s ({cal.forwards} probe forwards)")
    return 0
