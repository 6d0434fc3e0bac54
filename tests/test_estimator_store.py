"""The estimator file: round trip, and every way a file that does not fit is refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hubtest import MODEL_ID, assert_same, inputs, tiny_llama

from sparse_unsloth.estimator.cache import cache_path, default_repo_id, hub_filename, sanitize, zlab_repo_id
from sparse_unsloth.estimator.resolve import build_estimator
from sparse_unsloth.estimator.store import EstimatorFileError, load_factors, read_metadata, save_factors

RANK = 4


@pytest.fixture(scope="module")
def built():
    model = tiny_llama()
    weights, fp = inputs(model)
    return build_estimator(weights, RANK, fp, MODEL_ID, "abc123", progress=False), fp


@pytest.fixture
def saved(built, tmp_path):
    factors, fp = built
    return save_factors(factors, tmp_path / "est.safetensors"), factors, fp


def test_round_trip_keeps_factors_and_metadata(saved):
    path, factors, fp = saved
    loaded = load_factors(path, RANK, fp)
    assert_same(loaded, factors)
    assert (loaded.rank, loaded.fingerprint, loaded.model_id, loaded.revision) == (RANK, fp, MODEL_ID, "abc123")
    assert loaded.layers() == [0, 1, 2]
    assert loaded.extra["built_with"].startswith("sparse_unsloth")
    meta = read_metadata(path)
    assert json.loads(meta["layers"]) == [0, 1, 2] and meta["format_version"] == "1"
    assert not path.with_name(path.name + ".tmp").exists()


def test_shapes_follow_our_convention(built):
    factors, _ = built
    w1, w2 = factors["0.gate_proj"]
    assert w1.shape == (64, RANK) and w2.shape == (RANK, 128) and not w1.requires_grad
    x = torch.randn(3, 64)
    weight = tiny_llama().model.layers[0].mlp.gate_proj.weight.detach()
    # rank-4 of a random 128x64 matrix is rough; the SVD's best approximation beats a random one
    err = (x @ w1 @ w2 - x @ weight.T).norm()
    assert err < (x @ weight.T).norm()


def test_rank_mismatch_refused(saved):
    path, _, fp = saved
    with pytest.raises(EstimatorFileError, match=r"rank-4 .* rank 8; rebuild at rank 8 or set estimator_rank"):
        load_factors(path, 8, fp)


def test_fingerprint_mismatch_refused(saved):
    path, _, _ = saved
    _, other_fp = inputs(tiny_llama(seed=1))
    with pytest.raises(EstimatorFileError, match="built for another model"):
        load_factors(path, RANK, other_fp)


def test_truncated_file_refused(saved):
    path, _, fp = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(EstimatorFileError, match="truncated"):
        load_factors(path, RANK, fp)
    path.write_bytes(data[:5])
    with pytest.raises(EstimatorFileError, match="truncated or not safetensors"):
        load_factors(path, RANK, fp)


def test_corrupt_header_refused(saved):
    path, _, fp = saved
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(EstimatorFileError, match="corrupt safetensors header"):
        load_factors(path, RANK, fp)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(EstimatorFileError, match="truncated or not safetensors"):
        load_factors(path, RANK, fp)


def test_pickles_refused_without_unpickling(tmp_path, built):
    factors, fp = built
    bin_path = tmp_path / "est.bin"
    torch.save(factors.factors, bin_path)
    with pytest.raises(EstimatorFileError, match="never unpickles"):
        load_factors(bin_path, RANK, fp)
    disguised = tmp_path / "est.safetensors"
    disguised.write_bytes(bin_path.read_bytes())
    with pytest.raises(EstimatorFileError, match="pickle"):
        load_factors(disguised, RANK, fp)


def test_other_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(EstimatorFileError, match="not a sparse_unsloth estimator file"):
        load_factors(path)


def test_wrong_shapes_refused(tmp_path, built):
    factors, fp = built
    bad = type(factors)({"0.gate_proj": (torch.zeros(64, 3), torch.zeros(3, 128))}, RANK, fp)
    path = save_factors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(EstimatorFileError, match=r"expected \[in, 4\] and \[4, out\]"):
        load_factors(path, RANK, fp)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_factors(tmp_path / "nope.safetensors")


def test_cache_layout_and_repo_naming(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path))
    path = cache_path("unsloth/Meta-Llama-3.1-8B-bnb-4bit", 8, "0123456789abcdef")
    assert path == tmp_path / "estimators" / "unsloth--Meta-Llama-3.1-8B-bnb-4bit" / "rank8-0123456789ab.safetensors"
    assert sanitize("/models/my llama/") == "models--my--llama"
    assert default_repo_id("unsloth/Llama-3.2-1B") == "unsloth/Llama-3.2-1B-sparse-unsloth-estimator"
    assert default_repo_id(str(tmp_path)) is None and default_repo_id("") is None
    assert len(default_repo_id("a/" + "x" * 200).split("/")[1]) == 96
    assert zlab_repo_id("NousResearch/Meta-Llama-3-8B-Instruct") == "z-lab/Meta-Llama-3-8B-Instruct-SparseLoRA"
    assert hub_filename(8) == "estimator-rank8.safetensors"


def test_writers_at_once_never_share_a_temporary_file(built, tmp_path, monkeypatch):
    """Two processes building the same estimator (DDP ranks, parity runs side by side) save it to
    one path at once: each writes a temporary file of its own, and a failed write leaves none."""
    import threading

    from sparse_unsloth.estimator import store

    factors, fp = built
    real, written, both = store.save_file, [], threading.Barrier(2, timeout=5)

    def save_file(tensors, filename, metadata):
        written.append(filename)
        both.wait()                   # both writers hold their temporary file at the same time
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(store, "save_file", save_file)
    path = tmp_path / "est.safetensors"
    writers = [threading.Thread(target=save_factors, args=(factors, path)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert len(set(written)) == 2 and all(w.endswith(".tmp") for w in written)
    assert_same(load_factors(path, RANK, fp), factors)
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]

    def fails(tensors, filename, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_file", fails)
    with pytest.raises(OSError, match="disk full"):
        save_factors(factors, tmp_path / "other.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]
