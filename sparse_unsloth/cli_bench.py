"""``sparse-unsloth bench``: is sparse faster for my model and my rows, before a long run?"""

from __future__ import annotations

import argparse

from .cli_args import (
    add_lora_arguments,
    add_model_arguments,
    checked_config,
    import_unsloth_first,
    lora_settings,
    non_negative_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the top-level subparsers."""
    p = sub.add_parser(
        "bench", help="time dense vs sparse training steps of your model on your rows",
        description="Time STEPS dense and STEPS sparse training steps of one LoRA model (TRL's SFTTrainer; "
                    "Unsloth with --unsloth) on your rows, interleaved in pairs that train the same batch "
                    "dense and sparse, so that both see the same machine. Prints median/min/max step time, "
                    "tokens/s, the speed-up with its spread (or 'no measurable difference' and why), the "
                    "estimator's share, peak memory and the FLOP fraction; writes OUT/bench.json and "
                    "OUT/bench.png. On CPU the sparse layers run the reference path, which is not faster.")
    add_model_arguments(p, dense_allowed=False)
    add_lora_arguments(p)
    run = p.add_argument_group("timing")
    run.add_argument("--steps", type=positive_int, default=10,
                     help="timed steps of each mode (default: %(default)s)")
    run.add_argument("--warmup-steps", type=non_negative_int, default=2,
                     help="untimed steps of each mode first, each on a batch of its own (compilation, "
                          "allocations, and on a GPU the CUDA graphs); the timed steps go round the same "
                          "batches again, so they time the steady state (default: %(default)s)")
    run.add_argument("--fresh-batches", action="store_true",
                     help="time each pair on a batch not seen before, its CUDA graphs captured as in training "
                          "(a pass at its first sighting, a layer at its second): what a padding-free run costs, whose batch shapes "
                          "rarely come back (default: the steady state, on the warm-up's batches)")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="rows per step (default: %(default)s)")
    run.add_argument("--max-length", type=positive_int, default=512,
                     help="tokens per row, longer rows are cut (default: %(default)s)")
    run.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of LoRA init and the rows drawn (default: %(default)s)")
    run.add_argument("--out", default="outputs/sparse-unsloth-bench", metavar="DIR",
                     help="where bench.json and bench.png go (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--unsloth", action="store_true",
                   help="load with Unsloth's FastLanguageModel (needs a CUDA GPU): the fused fast path")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import_unsloth_first(args)
    from .bench import format_report, measure, write_outputs
    from .datasets_io import load_rows
    from .finetune import SHIPPED_MODEL, load_model, resolve_model
    from .patch import sparsify

    if args.model != SHIPPED_MODEL:
        resolve_model(args.model)
    config = checked_config(args, dense_allowed=False)
    rows = load_rows(args.dataset)
    model, tokenizer = load_model(args.model, lora_settings(args), unsloth=args.unsloth,
                                  max_length=args.max_length, seed=args.seed, progress=not args.no_progress)
    sparsify(model, config, args.estimator, progress=not args.no_progress)
    result = measure(model, tokenizer, rows, steps=args.steps, warmup_steps=args.warmup_steps,
                     batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.lr,
                     seed=args.seed, fresh_batches=args.fresh_batches, progress=not args.no_progress)
    settings = {key: value for key, value in vars(args).items() if key not in ("func", "prog")}
    written = write_outputs(result, args.out, settings | {"config": config})
    print(format_report(result))
    print(f"  json:  {written['json']}")
    print(f"  plot:  {written['plot']}" if written["plot"] else
          "  plot:  skipped (matplotlib is not installed: pip install matplotlib, or the [demo] extra)")
    return 0
