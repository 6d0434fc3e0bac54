"""Find the estimator factors a sparse model needs: given, cached, pulled from the Hub, or built.

The one resolver behind ``sparsify``, the CLI and the notebooks. Order:

1. ``source``: an :class:`EstimatorFactors`, a local file (ours), a local z-lab directory, or a
   Hub repo id (``owner/name``); an explicit source that does not fit is an error.
2. The local cache (:mod:`.cache`), one file per (model, weights fingerprint, rank).
3. The Hub: ``hub_repo``, else ``<model_id>-sparse-unsloth-estimator``, then
   ``z-lab/<name>-SparseLoRA`` (converted, and checked against the weights).
4. Build locally (SVD on the weights' device) when ``allow_build``; else raise with the fix.

Whatever is pulled or built is written to the cache (when there is a model id to key it by:
in-memory models without ``_name_or_path`` are not cached). Each step logs one line on the
``sparse_unsloth`` logger.

Under torch.distributed the cache steps run in turns: rank 0 first; then the first rank of each
other host, which finds rank 0's file in a shared cache or does the work for its node-local one;
then every other rank, which reads its host's cache. An explicit local source is read by every
rank. A failure on any rank raises on every rank (:func:`~sparse_unsloth.distributed.in_turns`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .. import distributed
from .cache import cache_path, default_repo_id, is_repo_id, zlab_repo_id
from .factors import EstimatorFactors, build_factors
from .hub import HubError, pull_factors
from .store import EstimatorFileError, load_factors, save_factors
from .zlab import is_zlab_dir, load_zlab, verify_against

log = logging.getLogger("sparse_unsloth")
Weights = Mapping[str, Callable[[], torch.Tensor]]
# Hub failures after which trying the next candidate repo is pointless.
_FATAL_HUB = ("offline", "unreachable", "unauthorized")


class EstimatorUnavailableError(RuntimeError):
    """No estimator could be found and building one was not allowed."""


def _check(factors: EstimatorFactors, keys: list[str], rank: int, fingerprint: str, where: str) -> None:
    if factors.rank != rank:
        raise EstimatorFileError(f"{where} holds rank-{factors.rank} factors but the config asks for "
                                 f"rank {rank}; set estimator_rank: {factors.rank} or rebuild")
    if factors.fingerprint and fingerprint and factors.fingerprint != fingerprint:
        raise EstimatorFileError(f"{where} was built for another model (fingerprint "
                                 f"{factors.fingerprint}) than this one ({fingerprint}); rebuild it")
    missing = _missing(factors, keys)
    if missing:
        raise EstimatorFileError(f"{where} lacks factors for {missing[:4]}{'...' if len(missing) > 4 else ''}"
                                 " that the config needs; rebuild it for these layers")


def _missing(factors: EstimatorFactors, keys: list[str]) -> list[str]:
    return [k for k in keys if k not in factors]


def _cache_turn() -> int:
    """This rank's turn at the cache: rank 0, then each other host's first rank, then the rest."""
    first = distributed.first_on_node()  # a collective: every rank calls it, rank 0 included
    return 0 if distributed.rank() == 0 else 1 if first else 2


def _store(factors: EstimatorFactors, path: Path) -> None:
    try:
        save_factors(factors, path)
        log.info("estimator: saved to cache %s", path)
    except OSError as err:  # a read-only home must not stop training
        log.warning("estimator: could not write the cache file %s (%s); continuing without it. Set "
                    "SPARSE_UNSLOTH_CACHE to a writable directory", path, err)


def _complete(factors: EstimatorFactors, weights: Weights, keys: list[str], allow_build: bool,
              progress: bool, where: str) -> EstimatorFactors:
    """``factors`` plus locally built factors for the projections it lacks (the union)."""
    missing = _missing(factors, keys)
    if not missing:
        return factors
    layers = sorted({int(k.split(".", 1)[0]) for k in missing})
    if not allow_build:
        raise EstimatorUnavailableError(f"{where} lacks factors for layers {layers} that the config needs "
                                        "and allow_build=False; allow building, or give a complete file")
    log.info("estimator: %s lacks %d projections (layers %s); building them and storing the union",
             where, len(missing), layers)
    built = build_estimator({k: weights[k] for k in missing}, factors.rank, factors.fingerprint,
                            progress=progress)
    return EstimatorFactors({**factors.factors, **built.factors}, factors.rank, factors.fingerprint,
                            factors.model_id, factors.revision, factors.extra)


def build_estimator(weights: Weights, rank: int, fingerprint: str, model_id: str = "", revision: str = "",
                    device: torch.device | str | None = None, progress: bool = True) -> EstimatorFactors:
    """Build the factors locally (SVD on ``device``, default the weights' own) and record how."""
    from .. import __version__

    with torch.no_grad():  # a plain (non-PEFT) model's weights require grad; the SVD needs none
        factors = build_factors(weights, rank, device=device, progress=progress, fingerprint=fingerprint,
                                model_id=model_id, revision=revision)
    w1 = next(iter(factors.factors.values()), (None,))[0]
    where = f"on {w1.device.type}, factors stored in {str(w1.dtype).removeprefix('torch.')}" if w1 is not None \
        else "(no projections)"
    factors.extra["built_with"] = f"sparse_unsloth {__version__}, torch {torch.__version__}: float32 SVD {where}"
    return factors


def _from_source(source: str | Path, weights: Weights, keys: list[str], rank: int,
                 fingerprint: str) -> EstimatorFactors:
    """An explicit local file or z-lab directory: used as is, or an error."""
    if Path(source).is_dir() and is_zlab_dir(source):
        factors = load_zlab(source, rank, source=str(source))
        verify_against(factors, weights, str(source), fingerprint)
        log.info("estimator: converted the z-lab estimator in %s", source)
    else:
        factors = load_factors(source, rank, fingerprint or None)
        log.info("estimator: loaded %s", source)
    _check(factors, keys, rank, fingerprint, str(source))
    return factors


def _load_cached(path: Path, rank: int, fingerprint: str) -> EstimatorFactors | None:
    if not path.is_file():
        log.info("estimator: not in the local cache (%s)", path)
        return None
    try:
        factors = load_factors(path, rank, fingerprint)
    except EstimatorFileError as err:
        log.warning("estimator: refused the cached file: %s", err)
        return None
    log.info("estimator: found in the local cache %s", path)
    return factors


def _from_hub(repos: list[str], weights: Weights, rank: int, fingerprint: str, hub_revision: str | None,
              token: str | None, endpoint: str | None, workdir: Path | None, reasons: list[str],
              ) -> EstimatorFactors | None:
    for repo in repos:
        try:
            if workdir is not None:  # download next to the cache file: same disk, no copy across
                workdir.mkdir(parents=True, exist_ok=True)
            factors = pull_factors(repo, rank, fingerprint, weights, revision=hub_revision, token=token,
                                   endpoint=endpoint, workdir=workdir)
        except HubError as err:
            reasons.append(str(err))
            (log.info if err.kind == "not_found" else log.warning)("estimator: %s", err)
            if err.kind in _FATAL_HUB:
                break
            continue
        except (EstimatorFileError, OSError) as err:
            reasons.append(str(err))
            log.warning("estimator: refused the file from Hub repo %s: %s", repo, err)
            continue
        log.info("estimator: pulled from Hub repo %s @ %s", repo, factors.extra.get("hub_revision", "?")[:12])
        return factors
    return None


def resolve_factors(weights: Weights, rank: int, fingerprint: str,
                    source: str | Path | EstimatorFactors | None = None, model_id: str = "",
                    progress: bool = True, *, revision: str = "", hub_repo: str | None = None,
                    hub_revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    allow_hub: bool = True, allow_build: bool = True, token: str | None = None,
                    endpoint: str | None = None) -> EstimatorFactors:
    """Factors for the projections in ``weights`` at ``rank``, checked against ``fingerprint``.

    ``weights``: ``"{layer}.{proj}" -> weight getter`` for the projections needed; ``fingerprint``:
    :func:`~sparse_unsloth.estimator.store.fingerprint` of all the model's estimated weights;
    ``model_id``/``revision``: the base model (names the cache dir and the default Hub repo,
    recorded in the file). ``hub_repo``/``hub_revision``: the Hub repo (and commit) to pull from.
    ``allow_hub=False`` skips the Hub; ``allow_build=False`` raises
    :class:`EstimatorUnavailableError` instead of building.
    """
    keys = sorted(weights)
    if isinstance(source, EstimatorFactors) or (not keys and source is None) or \
            (source is not None and not is_repo_id(str(source))):
        # Nothing shared to wait for: each rank checks its own, and all learn of any rank's failure.
        return distributed.in_turns(
            lambda: _given(source, weights, keys, rank, fingerprint, model_id, revision), 0, 1)
    if source is not None:  # an explicit Hub repo id
        hub_repo, allow_hub = str(source), True
    return distributed.in_turns(
        lambda: _resolve(weights, keys, rank, fingerprint, model_id, revision, progress, hub_repo,
                         hub_revision, cache_dir, allow_hub, allow_build, token, endpoint),
        _cache_turn(), 3)


def _given(source: str | Path | EstimatorFactors | None, weights: Weights, keys: list[str], rank: int,
           fingerprint: str, model_id: str, revision: str) -> EstimatorFactors:
    """Factors passed in, an explicit local source, or none needed: no cache, no Hub."""
    if isinstance(source, EstimatorFactors):
        _check(source, keys, rank, fingerprint, "the given estimator")
        log.info("estimator: using the factors passed in")
        return source
    if source is None:  # nothing sparse: no file to find, fetch or write
        log.debug("estimator: the config makes no layer sparse; no factors needed")
        return EstimatorFactors({}, rank, fingerprint, model_id, revision)
    return _from_source(source, weights, keys, rank, fingerprint)


def _resolve(weights: Weights, keys: list[str], rank: int, fingerprint: str, model_id: str, revision: str,
             progress: bool, hub_repo: str | None, hub_revision: str | None,
             cache_dir: str | os.PathLike | None, allow_hub: bool, allow_build: bool, token: str | None,
             endpoint: str | None) -> EstimatorFactors:
    path = cache_path(model_id, rank, fingerprint, cache_dir)
    # No model id (an in-memory model) or no fingerprint: nothing safe to key a cache file by.
    cacheable = bool(model_id and fingerprint)
    if not cacheable:
        log.info("estimator: not cached (no %s); pass model_id= to cache it",
                 "model id" if not model_id else "fingerprint")
        if distributed.is_distributed():
            log.warning("estimator: with no cache file to share, every rank resolves its own estimator; "
                        "pass model_id= so that one rank builds it and the others read it")
    factors = _load_cached(path, rank, fingerprint) if cacheable else None
    if factors is not None:
        if not _missing(factors, keys):
            return factors
        factors = _complete(factors, weights, keys, allow_build, progress, f"the cached file {path}")
        _store(factors, path)  # overwrite with the union: the next run finds everything
        return factors
    reasons: list[str] = []
    repos = [hub_repo] if hub_repo else [r for r in (default_repo_id(model_id), zlab_repo_id(model_id)) if r]
    if not allow_hub:
        log.info("estimator: Hub lookup disabled (allow_hub=False)")
    elif not repos:
        log.info("estimator: no Hub repo to try (model id %r is not owner/name; pass hub_repo=)", model_id)
    else:
        factors = _from_hub(repos, weights, rank, fingerprint, hub_revision, token, endpoint,
                            path.parent if cacheable else None, reasons)
    if factors is not None:
        factors.model_id = factors.model_id or model_id
        factors.revision = factors.revision or revision
        factors = _complete(factors, weights, keys, allow_build, progress,
                            f"Hub repo {factors.extra.get('hub_repo')}")
        if cacheable:
            _store(factors, path)
        return factors
    if not allow_build:
        raise EstimatorUnavailableError(
            "no estimator found (" + ("; ".join(reasons) or "not cached, Hub not tried") + ") and "
            "allow_build=False. Fix the Hub access above, give a local file (estimator=PATH), or allow "
            "building (allow_build=True / `sparse-unsloth estimator build`)")
    log.info("estimator: building rank-%d factors locally for %d projections%s", rank, len(keys),
             " (the Hub had none usable)" if reasons else "")
    factors = build_estimator(weights, rank, fingerprint, model_id, revision, progress=progress)
    if cacheable:
        _store(factors, path)
    return factors
