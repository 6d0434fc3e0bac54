"""Where estimator files live on disk, and how the Hub repos holding them are named.

Local cache (``$SPARSE_UNSLOTH_CACHE``, else ``~/.cache/sparse_unsloth``)::

    estimators/<model-id-sanitized>/rank<r>-<fingerprint[:12]>.safetensors

The fingerprint (a hash of the frozen weights) stands for the model revision: two revisions
with different weights get different files, and a bf16 and a 4-bit copy of one model do too.

Hub convention: the estimator of ``owner/Model`` lives in the model repo
``owner/Model-sparse-unsloth-estimator`` (:func:`default_repo_id`), one file per rank named
``estimator-rank<r>.safetensors`` (:func:`hub_filename`), with a README model card.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_ENV = "SPARSE_UNSLOTH_CACHE"
REPO_SUFFIX = "-sparse-unsloth-estimator"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_NAME_MAX = 96  # the Hub refuses longer repo names


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The local cache root: ``override``, else ``$SPARSE_UNSLOTH_CACHE``, else ``~/.cache/sparse_unsloth``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_unsloth"


def sanitize(model_id: str) -> str:
    """A directory name for a model id or path (``owner/name`` -> ``owner--name``)."""
    name = re.sub(r"[^\w.-]+", "--", model_id.strip().strip("/\\")).strip("-.")
    return name or "_unnamed"


def cache_path(model_id: str, rank: int, fingerprint: str,
               root: str | os.PathLike | None = None) -> Path:
    """The cache file for one (model, weights, rank)."""
    name = f"rank{rank}-{fingerprint[:12]}.safetensors" if fingerprint else f"rank{rank}.safetensors"
    return cache_dir(root) / "estimators" / sanitize(model_id) / name


def hub_filename(rank: int) -> str:
    """The estimator file's name inside a Hub repo."""
    return f"estimator-rank{rank}.safetensors"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id (``owner/name``) rather than a local path."""
    return bool(_REPO_ID.match(text)) and not Path(text).exists() and not text.endswith(".safetensors")


def default_repo_id(model_id: str) -> str | None:
    """``owner/Model`` -> ``owner/Model-sparse-unsloth-estimator``; None for local paths."""
    if not model_id or not is_repo_id(model_id):
        return None
    owner, name = model_id.split("/")
    return f"{owner}/{name[:_HUB_NAME_MAX - len(REPO_SUFFIX)]}{REPO_SUFFIX}"


def zlab_repo_id(model_id: str) -> str | None:
    """The z-lab SparseLoRA repo named after ``owner/Model`` (``z-lab/Model-SparseLoRA``), if any."""
    if not model_id or not is_repo_id(model_id):
        return None
    return f"z-lab/{model_id.split('/')[1]}-SparseLoRA"
