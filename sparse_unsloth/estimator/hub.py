"""Estimator files on the Hugging Face Hub: pull (ours or the z-lab format) and push.

Repo naming and file names: see :mod:`sparse_unsloth.estimator.cache`. Every Hub failure is
turned into a :class:`HubError` whose ``kind`` says what went wrong (``offline``,
``unreachable``, ``unauthorized``, ``not_found``) and whose message says how to fix it, so the
resolver can decide whether to fall back to building locally.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .cache import hub_filename, is_repo_id
from .factors import FORMAT_VERSION, EstimatorFactors
from .store import FORMAT_NAME, load_factors, save_factors
from .zlab import CONFIG_FILE, WEIGHTS_FILE, load_zlab, verify_against


class HubError(RuntimeError):
    """The Hub could not give (or take) an estimator; ``kind`` is the reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _endpoint(endpoint: str | None) -> str | None:
    # huggingface_hub reads HF_ENDPOINT once at import; reading it per call lets it be set later.
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _as_hub_error(err: Exception, repo_id: str, action: str, url: str) -> HubError:
    """Classify a huggingface_hub / network exception (order matters: subclasses first)."""
    from huggingface_hub import errors

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, errors.OfflineModeIsEnabled):
        return HubError("offline", f"cannot {action} {repo_id}: Hugging Face offline mode is on "
                                   "(HF_HUB_OFFLINE=1); unset it to use the Hub")
    if isinstance(err, errors.GatedRepoError) or (status in (401, 403)
                                                   and not isinstance(err, errors.RepositoryNotFoundError)):
        access = "write" if action.startswith("push") else "read"
        return HubError("unauthorized", f"cannot {action} {repo_id}: the Hub refused the token (HTTP "
                                        f"{status}). Log in with `hf auth login` or set HF_TOKEN to a token "
                                        f"with {access} access to this repo, or pass another repo id")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError("not_found", f"Hub repo {repo_id} does not exist (or is private and the token "
                                     "cannot read it)")
    if isinstance(err, (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError)):
        return HubError("not_found", f"Hub repo {repo_id} has no such revision or file ({err})")
    if isinstance(err, errors.HfHubHTTPError) and status is not None and status < 500:
        return HubError("not_found" if status == 404 else "unauthorized",
                        f"cannot {action} {repo_id}: HTTP {status} from the Hub ({err})")
    return HubError("unreachable", f"cannot {action} {repo_id}: the Hub ({url}) "
                                   f"is unreachable ({type(err).__name__}: {err}). Check the network or "
                                   "HF_ENDPOINT, or work offline with a local estimator file")


def _hub_call(action: str, repo_id: str, url: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HubError:
        raise
    except Exception as err:  # every transport/HTTP error becomes a HubError
        raise _as_hub_error(err, repo_id, action, url) from err


def pull_factors(repo_id: str, rank: int, fingerprint: str | None = None,
                 weights: Mapping[str, Callable[[], torch.Tensor]] | None = None, *,
                 revision: str | None = None, token: str | None = None, endpoint: str | None = None,
                 workdir: str | Path | None = None) -> EstimatorFactors:
    """Download the rank-``rank`` estimator of ``repo_id`` and verify it.

    Our format (``estimator-rank<r>.safetensors``) is checked against ``fingerprint``; a z-lab
    repo (``config.json`` + ``model.safetensors``) has none, so it is converted and checked
    against ``weights`` (refused if neither is given). The commit pulled is recorded in
    ``extra["hub_repo"]`` / ``extra["hub_revision"]``. Raises :class:`HubError` (Hub problems)
    or :class:`~sparse_unsloth.estimator.store.EstimatorFileError` (a file that does not fit).
    """
    from huggingface_hub import HfApi, constants, errors, hf_hub_download

    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    if constants.is_offline_mode():  # skip the request (and its retries) that would fail anyway
        raise _as_hub_error(errors.OfflineModeIsEnabled(), repo_id, "pull", api.endpoint)
    # A bounded wait: on a machine without network this runs inside sparsify(), before training.
    info = _hub_call("pull", repo_id, api.endpoint, api.model_info, repo_id, revision=revision,
                     timeout=constants.HF_HUB_ETAG_TIMEOUT)
    files = {s.rfilename for s in info.siblings or []}
    ours = hub_filename(rank)

    def fetch(name: str, into: str) -> Path:
        # Pinned to the sha model_info saw, so the config and the weights come from one commit.
        return Path(_hub_call("pull", repo_id, api.endpoint, hf_hub_download, repo_id, name,
                              revision=info.sha, local_dir=into, token=token, endpoint=api.endpoint))

    with tempfile.TemporaryDirectory(dir=workdir, prefix="pull-") as tmp:
        if ours in files:
            factors = load_factors(fetch(ours, tmp), rank, fingerprint)
        elif {CONFIG_FILE, WEIGHTS_FILE} <= files:
            fetch(CONFIG_FILE, tmp)
            fetch(WEIGHTS_FILE, tmp)
            factors = load_zlab(tmp, rank, source=repo_id, revision=info.sha or "")
            if weights is None:
                raise HubError("unverifiable", f"{repo_id} is in the z-lab format, which carries no model "
                                               "fingerprint; pass the model's weights to verify it (CLI: --verify)")
            verify_against(factors, weights, repo_id, fingerprint or "")
        else:
            others = sorted(f for f in files if f.startswith("estimator-rank"))
            raise HubError("not_found", f"Hub repo {repo_id} has no {ours}"
                                        f"{' (it has ' + ', '.join(others) + ')' if others else ''}; "
                                        "build it locally or set estimator_rank to a rank it has")
    factors.extra.update(hub_repo=repo_id, hub_revision=info.sha or "")
    return factors


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def model_card(factors: EstimatorFactors, repo_id: str) -> str:
    """The README.md pushed next to the estimator file."""
    from .. import __version__

    base = factors.model_id or "unknown"
    layers = factors.layers()
    built = factors.extra.get("built_with", f"sparse_unsloth {__version__}")
    return f"""---
library_name: sparse_unsloth
tags: [sparse-unsloth, sparselora, svd-estimator]
{f'base_model: {base}' if is_repo_id(base) else ''}
---

# SparseLoRA estimator for {base}

Rank-{factors.rank} SVD factors of the frozen projections of `{base}`, used by
`sparse_unsloth` to pick the channels each batch keeps (SparseLoRA
contextual sparsity). Not a model: it cannot generate text.

| | |
|---|---|
| base model | `{base}` |
| base model revision | `{factors.revision or 'unknown'}` |
| rank | {factors.rank} |
| layers | {_ranges(layers)} ({len(layers)} layers, {len(factors.factors)} projections) |
| file | `{hub_filename(factors.rank)}` |
| format | `{FORMAT_NAME}` version {FORMAT_VERSION} (safetensors; metadata holds all of this table) |
| weights fingerprint | `{factors.fingerprint}` |
| built with | {built} |

How it was built: for each frozen weight `W` (`[out, in]`; a 4-bit weight is dequantized first),
a float32 SVD `W = U S V^T`; stored `w1 = V_r S_r^1/2` (`[in, r]`) and `w2 = S_r^1/2 U_r^T`
(`[r, out]`) as `{{layer}}.{{proj}}.w1/w2`, so `x @ w1 @ w2` approximates `x @ W.T`.
The fingerprint hashes every weight's shape and a few sampled rows: sparse_unsloth refuses
this file for a model whose weights differ.

```python
import sparse_unsloth
model = sparse_unsloth.sparsify(model, "<preset>", estimator="{repo_id}")
# or: sparse-unsloth estimator pull --model {base} --repo {repo_id} --rank {factors.rank}
```
"""


def push_factors(factors: EstimatorFactors | str | Path, repo_id: str, *, token: str | None = None,
                 endpoint: str | None = None, private: bool = False,
                 commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the estimator file and its model card in one commit.

    A second push to the same repo adds a new commit (the Hub keeps the history). Returns the
    commit sha. Raises :class:`HubError` when the Hub is unreachable or refuses the token.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(factors, EstimatorFactors):
        factors = load_factors(factors)
    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    _hub_call("push to", repo_id, api.endpoint, api.create_repo, repo_id, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        path = save_factors(factors, Path(tmp) / hub_filename(factors.rank))
        ops = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)),
               CommitOperationAdd(path_in_repo="README.md",
                                  path_or_fileobj=model_card(factors, repo_id).encode())]
        message = commit_message or f"sparse_unsloth estimator, rank {factors.rank}, " \
                                    f"fingerprint {factors.fingerprint[:12] or 'none'}"
        info = _hub_call("push to", repo_id, api.endpoint, api.create_commit, repo_id, ops,
                         commit_message=message)
    return info.oid
