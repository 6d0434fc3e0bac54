"""The ``sparse-unsloth`` command line: one parser, subcommands registered by their modules.

To add a command group, write a module with ``register(subparsers)`` that adds its parsers and
sets ``func`` (``args -> exit code``) on each, and list the module in :data:`COMMAND_MODULES`.
Modules import torch / transformers inside their functions, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence

# The one registry of command groups (another engineer adds train / bench here).
COMMAND_MODULES = ("sparse_unsloth.cli_train", "sparse_unsloth.demo", "sparse_unsloth.cli_estimator",
                   "sparse_unsloth.cli_calibrate")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="sparse-unsloth",
        description="SparseLoRA contextual sparsity for Unsloth / PEFT LoRA fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    # Only our logger, and only while the command runs: the caller's logging config stays untouched
    # (main() is also called in-process, by tests and notebooks).
    logger = logging.getLogger("sparse_unsloth")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparse-unsloth``; returns the exit code."""
    args = build_parser().parse_args(argv)
    with _logging_to_stderr(args.verbose):
        try:
            return int(args.func(args) or 0)
        except (ValueError, RuntimeError, OSError) as err:  # our errors name the problem and the fix
            if args.verbose:
                raise
            print(f"sparse-unsloth: error: {err}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
