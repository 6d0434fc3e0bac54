"""The estimator resolver against a real Hub server on 127.0.0.1 (minihub): pull, push, refuse, build."""

from __future__ import annotations

import logging

import pytest
import torch
from hubtest import (
    MODEL_ID,
    TOKEN,
    assert_same,
    dead_endpoint,
    inputs,
    local_hub,
    tiny_llama,
    write_zlab_repo,
)

from sparse_unsloth.estimator.cache import cache_path, hub_filename
from sparse_unsloth.estimator.factors import svd_factors
from sparse_unsloth.estimator.hub import HubError, pull_factors, push_factors
from sparse_unsloth.estimator.resolve import EstimatorUnavailableError, resolve_factors
from sparse_unsloth.estimator.store import EstimatorFileError, load_factors, save_factors

RANK = 4
REPO = MODEL_ID + "-sparse-unsloth-estimator"
ZLAB_REPO = "z-lab/tiny-llama-SparseLoRA"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with local_hub(tmp_path / "hub-data", monkeypatch) as srv:
        yield srv


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="sparse_unsloth")
    return caplog


def _resolve(model, cache, layers=None, **kw):
    weights, fp = inputs(model, layers)
    return resolve_factors(weights, RANK, fp, model_id=MODEL_ID, cache_dir=cache, progress=False, **kw)


def _messages(logs) -> list[str]:
    return [r.getMessage() for r in logs.records if r.name == "sparse_unsloth"]


def test_miss_builds_then_push_then_fresh_cache_pulls_the_same(hub, model, tmp_path, logs):
    built = _resolve(model, tmp_path / "a")
    text = "\n".join(_messages(logs))
    assert f"Hub repo {REPO} does not exist" in text and "building rank-4 factors locally" in text
    assert (tmp_path / "a" / "estimators" / "acme--tiny-llama").is_dir()
    sha = push_factors(built, REPO)
    logs.clear()
    pulled = _resolve(model, tmp_path / "b")
    assert any(m.startswith(f"estimator: pulled from Hub repo {REPO} @ {sha[:12]}") for m in _messages(logs))
    assert_same(pulled, built)
    assert pulled.fingerprint == built.fingerprint and pulled.extra["hub_revision"] == sha
    # the pull was cached: a third resolve needs no Hub at all
    logs.clear()
    hub.shutdown()
    again = _resolve(model, tmp_path / "b")
    assert_same(again, built)
    assert any("found in the local cache" in m for m in _messages(logs))


def test_pull_hit_and_model_card(hub, model, tmp_path):
    _, fp = inputs(model)
    built = _resolve(model, tmp_path / "a", allow_hub=False)
    push_factors(built, REPO)
    pulled = pull_factors(REPO, RANK, fp)
    assert_same(pulled, built)
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(REPO, "README.md", endpoint=hub.url, cache_dir=tmp_path / "hf")
    with open(path) as f:
        card = f.read()
    for expected in (f"base_model: {MODEL_ID}", f"| rank | {RANK} |", fp, "sparse_unsloth.estimator",
                     "0-2 (3 layers, 15 projections)", "float32 SVD"):
        assert expected in card


def test_second_push_updates(hub, model, tmp_path):
    first = _resolve(model, tmp_path / "a", layers=[0], allow_hub=False)
    sha1 = push_factors(first, REPO)
    second = _resolve(model, tmp_path / "a", allow_hub=False)  # the cache grows to all 3 layers
    sha2 = push_factors(second, REPO)
    assert sha1 != sha2
    pulled = pull_factors(REPO, RANK, second.fingerprint)
    assert pulled.layers() == [0, 1, 2] and pulled.extra["hub_revision"] == sha2
    assert pull_factors(REPO, RANK, revision=sha1).layers() == [0]  # the old commit stays pinned


def test_partial_cache_is_completed_with_the_union(model, tmp_path, logs):
    part = _resolve(model, tmp_path, layers=[1], allow_hub=False)
    assert part.layers() == [1]
    full = _resolve(model, tmp_path, allow_hub=False)
    assert full.layers() == [0, 1, 2]
    assert any("lacks 10 projections (layers [0, 2]); building them and storing the union" in m
               for m in _messages(logs))
    torch.testing.assert_close(full["1.q_proj"][0], part["1.q_proj"][0])
    assert load_factors(cache_path(MODEL_ID, RANK, part.fingerprint, tmp_path)).layers() == [0, 1, 2]


def test_fingerprint_mismatch_on_hub_refused(hub, model, tmp_path, logs):
    other = tiny_llama(seed=1)
    push_factors(_resolve(other, tmp_path / "other", allow_hub=False), REPO)
    with pytest.raises(EstimatorUnavailableError, match="built for another model"):
        _resolve(model, tmp_path / "a", allow_build=False)
    logs.clear()
    factors = _resolve(model, tmp_path / "a")
    assert factors.fingerprint == inputs(model)[1]
    text = "\n".join(_messages(logs))
    assert "refused the file from Hub repo" in text and "building rank-4 factors locally" in text


def test_corrupt_cache_is_rebuilt(model, tmp_path, logs):
    built = _resolve(model, tmp_path, allow_hub=False)
    path = cache_path(MODEL_ID, RANK, built.fingerprint, tmp_path)
    path.write_bytes(path.read_bytes()[:-64])
    again = _resolve(model, tmp_path, allow_hub=False)
    assert_same(again, built)
    assert any("refused the cached file" in m and "truncated" in m for m in _messages(logs))
    assert load_factors(path, RANK, built.fingerprint).layers() == [0, 1, 2]


def test_explicit_file_that_does_not_fit_is_an_error(model, tmp_path):
    weights, fp = inputs(model)
    part = _resolve(model, tmp_path, layers=[0], allow_hub=False)
    path = save_factors(part, tmp_path / "part.safetensors")
    with pytest.raises(EstimatorFileError, match="lacks factors"):
        resolve_factors(weights, RANK, fp, source=path)
    with pytest.raises(EstimatorFileError, match="rank-4 factors but the config asks for rank 2"):
        resolve_factors(weights, 2, fp, source=path)
    assert resolve_factors(inputs(model, [0])[0], RANK, fp, source=path).layers() == [0]


def test_push_with_a_wrong_token_is_401(hub, model, tmp_path):
    factors = _resolve(model, tmp_path, allow_hub=False)
    with pytest.raises(HubError, match="refused the token .*HTTP 401.*HF_TOKEN") as err:
        push_factors(factors, REPO, token="wrong")
    assert err.value.kind == "unauthorized"


def test_pull_404_without_build_says_how_to_fix(hub, model, tmp_path):
    with pytest.raises(EstimatorUnavailableError, match=rf"{REPO} does not exist.*allow_build=False"):
        _resolve(model, tmp_path, allow_build=False)
    push_factors(_resolve(model, tmp_path / "a", allow_hub=False), REPO)
    with pytest.raises(HubError, match="has no estimator-rank8.safetensors .*estimator-rank4"):
        pull_factors(REPO, 8)


def test_server_down_falls_back_to_building(model, tmp_path, monkeypatch, logs):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    url = dead_endpoint()
    with pytest.raises(EstimatorUnavailableError, match="unreachable.*HF_ENDPOINT"):
        _resolve(model, tmp_path, allow_build=False, endpoint=url)
    logs.clear()
    factors = _resolve(model, tmp_path, endpoint=url)
    assert factors.layers() == [0, 1, 2]
    text = "\n".join(_messages(logs))
    assert "is unreachable" in text and "building rank-4 factors locally" in text
    assert "z-lab" not in text  # an unreachable Hub is not asked twice


def test_offline_mode_skips_the_hub(model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EstimatorUnavailableError, match="offline mode is on"):
        _resolve(model, tmp_path, allow_build=False)


def _upload_zlab(server, directory) -> None:
    """Publish ``directory`` as z-lab/tiny-llama-SparseLoRA, the repo named after MODEL_ID."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo(ZLAB_REPO)
    api.upload_folder(folder_path=str(directory), repo_id=ZLAB_REPO)


def test_zlab_repo_is_converted_and_checked(hub, model, tmp_path, logs):
    repo_dir = tmp_path / "zlab"
    write_zlab_repo(repo_dir, model, RANK, layers=[1, 2], transpose_q=True)
    _upload_zlab(hub, repo_dir)

    factors = _resolve(model, tmp_path / "a", layers=[1, 2], allow_build=False)
    assert factors.layers() == [1, 2] and factors.extra["converted_from"] == "z-lab/sparselora"
    assert factors.fingerprint == inputs(model)[1]  # stamped once verified, so the cache can check it
    weights, _ = inputs(model, [1, 2])
    for key in ("1.q_proj", "2.up_proj", "2.v_proj"):
        w1, w2 = svd_factors(weights[key]().detach(), RANK)
        torch.testing.assert_close((factors[key][0].float() @ factors[key][1].float()), w1 @ w2,
                                   atol=0.02, rtol=0.02)
    assert any(f"pulled from Hub repo {ZLAB_REPO}" in m for m in _messages(logs))
    # layer 0 is not in the z-lab file: it is built and the union is cached
    full = _resolve(model, tmp_path / "b")
    assert full.layers() == [0, 1, 2]
    # projections the model's needed weights do not cover cannot be checked, so they are dropped
    assert _resolve(model, tmp_path / "c", layers=[2]).layers() == [2]


def test_zlab_repo_of_another_model_refused(hub, model, tmp_path):
    repo_dir = tmp_path / "zlab"
    write_zlab_repo(repo_dir, tiny_llama(seed=3), RANK, layers=[0, 1, 2])
    _upload_zlab(hub, repo_dir)
    with pytest.raises(EstimatorUnavailableError, match="not the rank-4 SVD of this model's weight"):
        _resolve(model, tmp_path, allow_build=False)
    # and a local z-lab directory given explicitly is checked the same way
    with pytest.raises(EstimatorFileError, match="projection ratio"):
        resolve_factors(inputs(model)[0], RANK, inputs(model)[1], source=repo_dir)


def test_explicit_repo_id_as_source(hub, model, tmp_path):
    built = _resolve(model, tmp_path / "a", allow_hub=False)
    push_factors(built, "someone/estimators-for-tiny")
    weights, fp = inputs(model)
    pulled = resolve_factors(weights, RANK, fp, source="someone/estimators-for-tiny",
                             cache_dir=tmp_path / "b", progress=False, allow_build=False)
    assert_same(pulled, built)
    from huggingface_hub import HfApi

    files = {s.rfilename for s in HfApi(endpoint=hub.url).model_info("someone/estimators-for-tiny").siblings}
    assert {hub_filename(RANK), "README.md"} <= files


def test_sparsify_resolves_through_the_hub(hub, model, tmp_path, monkeypatch):
    import sparse_unsloth as su

    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))
    built = _resolve(model, tmp_path / "a", allow_hub=False)
    push_factors(built, REPO)
    config = su.SparseConfig(mlp={1: 0.5}, self_attn={2: 0.5}, estimator_rank=RANK)
    for estimator, model_id in ((REPO, None), (None, MODEL_ID)):  # named explicitly, or derived
        su.sparsify(model, config, estimator, model_id=model_id, progress=False)
        factors = su.sparse_state(model).factors
        su.unsparsify(model)
        for key in ("1.gate_proj", "2.q_proj"):
            torch.testing.assert_close(factors[key][0], built[key][0])
    assert cache_path(MODEL_ID, RANK, built.fingerprint, tmp_path / "cache").is_file()


@pytest.mark.slow  # two spawned processes: ~10 s on 2 CPU cores
def test_distributed_rank_zero_builds_the_others_load(tmp_path):
    import json

    import torch.multiprocessing as mp
    from hubtest import ddp_worker

    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert any("building rank-4 factors locally" in m for m in logs[0]["log"])
    assert any("found in the local cache" in m for m in logs[1]["log"])
    assert not any("building" in m for m in logs[1]["log"])
    assert logs[0]["w1"] == logs[1]["w1"]
