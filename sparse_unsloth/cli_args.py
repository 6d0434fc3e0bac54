"""What the commands that train (``train``, ``bench``) share: their arguments, and the input
checks that run before any weights load. Imports nothing heavy at module level."""

from __future__ import annotations

import argparse

from .lora import ALL_PROJS, LoraSettings
from .smollm2 import SHIPPED_MODEL

DENSE = "dense"
SHIPPED_PRESET = "smollm2-135m"


class CommandError(ValueError):
    """A command-line mistake the argument parser cannot see; the message names the fix."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, *, dense_allowed: bool) -> None:
    """--model, --dataset, --config, --estimator."""
    p.add_argument("--model", default=SHIPPED_MODEL, metavar="PATH_OR_ID",
                   help=f"local model folder, Hugging Face model id, or '{SHIPPED_MODEL}' (the shipped "
                        "SmolLM2-135M-Instruct, offline) (default: %(default)s)")
    p.add_argument("--dataset", default="gsm8k", metavar="PATH_OR_NAME",
                   help="local .json/.jsonl/.parquet with prompt+completion, question+answer, messages or "
                        "text columns; 'gsm8k' (the shipped 1,000 train / 300 test rows); or a Hub dataset "
                        "'name[:config]' (default: %(default)s)")
    p.add_argument("--config", metavar="PRESET_OR_YAML",
                   help="sparsity preset or YAML path" + (f", or '{DENSE}'" if dense_allowed else "")
                        + f" (default: {SHIPPED_PRESET} for --model {SHIPPED_MODEL}, required otherwise)")
    p.add_argument("--estimator", metavar="FILE_OR_REPO",
                   help="estimator file or Hub repo (default: cache, then Hub, else built from the weights)")


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default: %(default)s)")
    lora.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    lora.add_argument("--target-modules", default=",".join(ALL_PROJS), metavar="NAMES",
                      help="comma-separated projections to adapt (default: all seven)")


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r, dropout=args.lora_dropout,
                        target_modules=targets)


def import_unsloth_first(args: argparse.Namespace) -> None:
    """With --unsloth on a GPU, import Unsloth before transformers / peft / trl: it patches them."""
    import torch

    if args.unsloth and torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401
        except ImportError as err:
            raise CommandError(f"--unsloth needs the unsloth package ({err}): pip install unsloth") from None


def checked_config(args: argparse.Namespace, *, dense_allowed: bool) -> str | None:
    """The --config to train with (None: dense), checked against the model's depth before the
    weights load: a config that names layers the model lacks fails here, not minutes later."""
    from .config import ConfigError, load_config
    from .finetune import model_layers

    config = args.config or (SHIPPED_PRESET if args.model == SHIPPED_MODEL else None)
    if config is None:
        choices = f"a preset, a YAML path, or '{DENSE}'" if dense_allowed else "a preset or a YAML path"
        raise ConfigError(f"--config is required for --model {args.model}: {choices}")
    if config == DENSE:
        if not dense_allowed:
            raise CommandError(f"--config {DENSE}: this command compares dense with sparse steps; give a "
                               "sparsity preset or YAML path")
        return None
    load_config(config, num_layers=model_layers(args.model))
    return config
