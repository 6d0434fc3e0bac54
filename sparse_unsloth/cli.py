"""The ``sparse-unsloth`` command line: one parser, subcommands registered by their modules.

To add a command, write a module with ``register(subparsers)`` that adds its parser(s) and sets
``func`` (``args -> exit code``) on each, and add the module to :data:`COMMAND_MODULES`. Command
modules import torch / transformers inside their functions only, so ``--help`` stays instant.

Exit codes, the same for every command (:data:`EXIT_CODES`): 0 done; 2 a usage or input error
(argparse's, or one of ours: one line on stderr naming the problem and the fix; ``-v`` adds the
traceback); 1 an unexpected error (a bug): Python's traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence

# The one registry of commands.
COMMAND_MODULES = ("sparse_unsloth.cli_train", "sparse_unsloth.cli_bench", "sparse_unsloth.demo",
                   "sparse_unsloth.cli_estimator", "sparse_unsloth.cli_calibrate")

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR = 0, 1, 2
EXIT_CODES = (f"exit codes: {EXIT_OK} done; {EXIT_USER_ERROR} a usage or input error (one line on stderr "
              f"that names the fix; -v adds the traceback); {EXIT_BUG} an unexpected error (a bug: "
              "the traceback is printed, please report it)")

# Our deliberate errors, by the module that defines each. An error is matched against the modules
# already imported (one never imported cannot have been raised), so an error message does not
# first cost the seconds that importing torch and transformers takes.
USER_ERRORS = {
    "sparse_unsloth.calibration": ("CalibrationError",),
    "sparse_unsloth.cli_args": ("CommandError",),
    "sparse_unsloth.config": ("ConfigError",),
    "sparse_unsloth.datasets_io": ("DatasetError",),
    "sparse_unsloth.estimator.hub": ("HubError",),
    "sparse_unsloth.estimator.resolve": ("EstimatorUnavailableError",),
    "sparse_unsloth.estimator.store": ("EstimatorFileError",),
    "sparse_unsloth.finetune": ("ModelSourceError",),
    "sparse_unsloth.patch.models": ("UnsupportedModelError",),
}
# Files that are not there or cannot be read (OSError), and what sparsify refuses to do yet
# (NotImplementedError: an Unsloth model off the GPU) are the user's to fix too.
_ENVIRONMENT_ERRORS = (OSError, NotImplementedError)

# Log records of other libraries that a user of this command cannot act on, by logger. bitsandbytes
# (imported by peft) warns on import that an optional CPU 4-bit kernel package is missing; the CLI
# never runs 4-bit matmuls on CPU. Shown with -v.
NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one whose message tells the user what to do (exit 2, one line)."""
    ours = tuple(getattr(sys.modules[module], name) for module, names in USER_ERRORS.items()
                 if module in sys.modules for name in names)
    return isinstance(err, _ENVIRONMENT_ERRORS + ours)


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="sparse-unsloth",
        description="SparseLoRA contextual sparsity for Unsloth / PEFT LoRA fine-tuning.", epilog=EXIT_CODES)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    # Each (sub)parser records its own prog ("sparse-unsloth estimator pull") as a default; the one
    # parsed last, the innermost, wins: error lines name the command that failed.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(prog=child.prog)
                _name_commands(child)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    # Only while the command runs, and only our logger and the NOISE loggers: the caller's logging
    # config stays untouched (main() is also called in-process, by tests and notebooks).
    logger = logging.getLogger("sparse_unsloth")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    filters = [] if verbose else [(logging.getLogger(name), _DropMessages(prefix))
                                  for name, prefix in NOISE.items()]
    for noisy, drop in filters:
        noisy.addFilter(drop)
    try:
        yield
    finally:
        for noisy, drop in filters:
            noisy.removeFilter(drop)
        logger.removeHandler(handler)
        logger.setLevel(level)


def one_line(err: BaseException) -> str:
    """An error's message on one line (some carry an indented pip command on the next)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparse-unsloth``; returns the exit code (see :data:`EXIT_CODES`)."""
    args = build_parser().parse_args(argv)
    with _logging(args.verbose):
        try:
            return int(args.func(args) or EXIT_OK)
        except Exception as err:
            if not is_user_error(err):
                raise
            if args.verbose:
                traceback.print_exc()
            print(f"{args.prog}: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
