"""``sparse-unsloth estimator build | pull | push | info``: the estimator cache from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_args import CommandError

_CACHE_HELP = "cache root (default: $SPARSE_UNSLOTH_CACHE, else ~/.cache/sparse_unsloth)"
_MODEL_HELP = "Hugging Face model id or local directory (as passed to from_pretrained)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``estimator`` and its actions to the top-level subparsers."""
    est = sub.add_parser(
        "estimator", help="build, pull, push or inspect SVD estimator files",
        description="The rank-r SVD estimator that picks the kept channels. Files are cached one per "
                    "(model, weights, rank) and shared on the Hugging Face Hub in "
                    "<owner>/<model>-sparse-unsloth-estimator repos.")
    actions = est.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="build the estimator from a model's weights",
                               description="Load the model, SVD its frozen projections, write the file.")
    _add_model(build)
    build.add_argument("--config", metavar="PRESET_OR_YAML",
                       help="sparsity preset or YAML: build only its sparse layers (default: all layers) "
                            "at its estimator_rank")
    build.add_argument("--rank", type=int, help="SVD rank (default: the config's estimator_rank, else 8)")
    where = build.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE", help="write here instead of the cache")
    where.add_argument("--cache", metavar="DIR", help=_CACHE_HELP)
    build.add_argument("--device", help="where the SVD runs (default: cuda if available, else cpu)")
    build.set_defaults(func=cmd_build)

    pull = actions.add_parser("pull", help="download an estimator from the Hub into the cache",
                              description="Download, verify and cache an estimator (ours or the z-lab "
                                          "SparseLoRA format).")
    _add_model(pull)
    pull.add_argument("--repo", help="Hub repo (default: <model>-sparse-unsloth-estimator)")
    pull.add_argument("--rank", type=int, default=8, help="SVD rank (default: 8)")
    pull.add_argument("--hub-revision", help="estimator repo branch or commit to pull (default: main)")
    pull.add_argument("--cache", metavar="DIR", help=_CACHE_HELP)
    pull.add_argument("--verify", action="store_true",
                      help="load the model and check the file against its weights (needed for z-lab repos)")
    pull.add_argument("--token", help="Hub token (default: HF_TOKEN / `hf auth login`)")
    pull.set_defaults(func=cmd_pull)

    push = actions.add_parser("push", help="upload an estimator file and its model card to the Hub",
                              description="Create the repo if needed and commit the file and a README "
                                          "model card; a second push adds a new commit.")
    push.add_argument("file", help="estimator .safetensors file (see `estimator build`)")
    push.add_argument("--repo", help="Hub repo (default: <model id in the file>-sparse-unsloth-estimator)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", help="Hub token with write access (default: HF_TOKEN / `hf auth login`)")
    push.set_defaults(func=cmd_push)

    info = actions.add_parser("info", help="print what an estimator file holds",
                              description="Print the metadata of an estimator file (or a z-lab directory).")
    info.add_argument("file", help="estimator .safetensors file, or a z-lab directory")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(func=cmd_info)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help=_MODEL_HELP)
    parser.add_argument("--revision", help="model revision (branch, tag or commit) to load")


def _load(args: argparse.Namespace, device: str | None = None):
    """(model, decoder layers); weights stay on ``device`` so the SVD runs there."""
    import torch
    from transformers import AutoModelForCausalLM

    from .patch.models import check_supported, decoder_layers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, dtype="auto")
    check_supported(model)
    if not getattr(getattr(model, "config", None), "quantization_config", None):
        model.to(device)  # quantized models are placed by from_pretrained and cannot move
    return model, decoder_layers(model)


def _weights(layers, which: dict[str, list[int]] | None = None):
    """(needed weights, fingerprint of all estimated weights), as sparsify computes them."""
    from .config import MODULE_KINDS
    from .estimator.store import fingerprint
    from .patch.models import estimated_weights

    every = estimated_weights(layers, {kind: range(len(layers)) for kind in MODULE_KINDS})
    needed = every if which is None else estimated_weights(layers, which)
    return needed, fingerprint(every)


def cmd_build(args: argparse.Namespace) -> int:
    from .config import MODULE_KINDS, load_config
    from .estimator.cache import cache_path
    from .estimator.resolve import build_estimator
    from .estimator.store import save_factors
    from .finetune import model_layers
    from .patch.models import model_identity

    if args.config:  # before the weights load: an unknown preset or a layer the model lacks fails at once
        load_config(args.config, num_layers=model_layers(args.model))
    model, layers = _load(args, args.device)
    which, rank = None, args.rank or 8
    if args.config:
        config = load_config(args.config, num_layers=len(layers))
        which = {kind: config.sparse_layers(kind) for kind in MODULE_KINDS}
        rank = args.rank or config.estimator_rank
    needed, fp = _weights(layers, which)
    if not needed:
        raise CommandError(f"config {args.config} makes no layer sparse; nothing to build")
    model_id, revision = model_identity(model)     # where sparsify will look for it
    factors = build_estimator(needed, rank, fp, model_id, revision or args.revision or "")
    path = Path(args.out) if args.out else cache_path(model_id, rank, fp, args.cache)
    print(save_factors(factors, path))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .estimator.cache import cache_path, default_repo_id
    from .estimator.hub import pull_factors
    from .estimator.store import save_factors

    repo = args.repo or default_repo_id(args.model)
    if not repo:
        raise CommandError(f"{args.model!r} is not a Hub model id (owner/name); pass --repo")
    weights, fp = None, None
    if args.verify:
        _, layers = _load(args)
        weights, fp = _weights(layers)
    workdir = cache_path(args.model, args.rank, "", args.cache).parent  # same disk as the final file
    workdir.mkdir(parents=True, exist_ok=True)
    factors = pull_factors(repo, args.rank, fp, weights, revision=args.hub_revision, token=args.token,
                           workdir=workdir)
    factors.model_id = factors.model_id or args.model
    print(save_factors(factors, cache_path(args.model, args.rank, factors.fingerprint, args.cache)))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .estimator.cache import default_repo_id
    from .estimator.hub import push_factors
    from .estimator.store import load_factors

    factors = load_factors(args.file)
    repo = args.repo or default_repo_id(factors.model_id)
    if not repo:
        raise CommandError(f"{args.file} names no Hub model id (model_id {factors.model_id!r}); pass --repo "
                         "<your-name>/<model>-sparse-unsloth-estimator")
    sha = push_factors(factors, repo, token=args.token, private=args.private)
    print(f"{repo}@{sha}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .estimator.store import read_metadata
    from .estimator.zlab import CONFIG_FILE, is_zlab_dir, read_config

    path = Path(args.file)
    if path.is_dir() and is_zlab_dir(path):
        config = read_config(path / CONFIG_FILE)
        meta = {"format": "z-lab/sparselora", "base_model": config.get("base_model", ""),
                "rank": config["predictor_rank"], "modes": sorted(config.get("modes", {}))}
    else:
        meta = read_metadata(path)
        meta["file_size"] = path.stat().st_size
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    first = ["format", "format_version", "model_id", "revision", "rank", "fingerprint", "layers", "projections"]
    for key, value in sorted(meta.items(), key=lambda kv: (first + [kv[0]]).index(kv[0])):
        if key == "projections":
            value = f"{len(json.loads(value))} ({', '.join(json.loads(value)[:4])}, ...)"
        print(f"{key:>16}: {value}")
    return 0
