"""Sparse training under DDP on CPU: 2 processes, gloo.

(a) hand-written steps under ``torchrun`` end with the LoRA weights of one process running the
same micro-batches as gradient accumulation; (b) TRL's SFTTrainer under ``accelerate launch``
trains with the stats summed over the ranks, logged once; (c) one rank's bad estimator ends
every rank with its message. The scripts the processes run are in ``tests/ddp_scripts/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_unsloth as su
from sparse_unsloth.estimator.store import save_factors

SCRIPTS = Path(__file__).parent / "ddp_scripts"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # each test starts 2-3 Python processes that import torch


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SPARSE_UNSLOTH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), str(SCRIPTS.parent), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    # Output to files (a full pipe would stall a rank); a session of its own, so a hang's
    # whole process tree (torchrun's workers too) can be killed.
    return subprocess.Popen(cmd, env=env, stdout=open(f"{logs}.out", "w"), stderr=open(f"{logs}.err", "w"),
                            start_new_session=True)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each; all killed and the test failed if any outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tails = "\n".join(Path(f"{log}.err").read_text()[-3000:] for log in logs)
        pytest.fail(f"still running after {timeout:.0f} s (a hang); stderr:\n{tails}")
    return [(p.returncode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text())
            for p, log in zip(procs, logs)]


def _estimator_file(tmp_path: Path, config: su.SparseConfig, model: torch.nn.Module) -> Path:
    """Build the tiny model's estimator once, as a file every process can read."""
    su.sparsify(model, config, progress=False)
    return save_factors(su.sparse_state(model).factors, tmp_path / "estimator.safetensors")


@pytest.mark.filterwarnings("ignore:sparse_unsloth. training without SparsityCallback")
def test_ddp_steps_match_one_process_with_each_micro_batch_choosing_its_channels(tmp_path, monkeypatch):
    from ddp_scripts import steps

    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))
    estimator = _estimator_file(tmp_path, steps.CONFIG, steps.tiny_model())
    log = tmp_path / "torchrun"
    proc = _start([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(steps.RANKS),
                   str(SCRIPTS / "steps.py"), str(tmp_path), str(estimator)], _env(tmp_path), log)

    def reference(micro_batches_of_step) -> dict[str, torch.Tensor]:
        model = su.sparsify(steps.tiny_model(), steps.CONFIG, estimator, progress=False)
        return steps.train(model, model, [micro_batches_of_step(s) for s in range(steps.STEPS)])

    initial = {n: p.detach().clone() for n, p in steps.tiny_model().named_parameters() if "lora_" in n}
    # One process, the same micro-batches as gradient accumulation: each forward picks its channels.
    accumulated = reference(lambda s: [steps.micro_batch(s, r) for r in range(steps.RANKS)])
    # The same rows as one batch: one channel choice for all of them, which DDP must not make.
    def one_batch(s):
        parts = [steps.micro_batch(s, r) for r in range(steps.RANKS)]
        return [{k: torch.cat([p[k] for p in parts]) for k in parts[0]}]
    joint = reference(one_batch)

    [(code, _, err)] = _wait([proc], [log], timeout=150)
    assert code == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(steps.RANKS)]
    assert all(r["stats"]["batches"] == steps.STEPS for r in ranks)           # sparse in every step
    assert all(0 < r["stats"]["mlp_kept"] < r["stats"]["mlp_total"] for r in ranks)
    ddp = ranks[0]["lora"]
    assert sorted(ddp) == sorted(accumulated) and len(ddp) == 2 * 7 * 2      # A and B, 7 projs, 2 layers
    for name in ddp:
        assert torch.equal(ddp[name], ranks[1]["lora"][name]), name          # the ranks agree bitwise
        torch.testing.assert_close(ddp[name], accumulated[name], rtol=1e-5, atol=1e-6)
    gap = max((ddp[n] - joint[n]).abs().max().item() for n in ddp)
    moved = max((ddp[n] - initial[n]).abs().max().item() for n in ddp)
    assert gap > 1e-3 and moved > 1e-2, (gap, moved)   # the check above can tell the two apart


def test_sft_trainer_under_accelerate_launch_logs_stats_summed_over_ranks_once(tmp_path):
    log = tmp_path / "accelerate"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPTS / "sft.py"), str(tmp_path)]
    [(code, _, err)] = _wait([_start(cmd, _env(tmp_path), log)], [log], timeout=240)
    assert code == 0, err[-3000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in logs] == [4, 8, 12, 16]
    assert all(not any(k.startswith("sparse/") for k in h) for h in history if "loss" not in h)
    # The frozen random LM head and final norm bound the tiny model's loss from below (about 4.4).
    losses = [h["loss"] for h in logs]
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < losses[1], losses   # falls, and on once sparse
    # The switch follows global_step, which the ranks share: 4 dense warm-up steps, then sparse.
    assert ranks[0]["enabled"] == ranks[1]["enabled"] == [False] * 4 + [True] * 12
    assert [h["sparse/active"] for h in logs] == [0.0, 1.0, 1.0, 1.0]
    local_fracs = []
    for entry, *counts in zip(logs[1:], ranks[0]["counters"][1:], ranks[1]["counters"][1:]):
        total = {k: sum(c[k] for c in counts) for k in counts[0]}
        assert total["batches"] == 2 * 4                           # each rank: one forward per step
        assert entry["sparse/dense_token_frac"] == pytest.approx(total["dense_tokens"] / total["tokens"])
        assert entry["sparse/estimator_ms"] == pytest.approx(1e3 * total["estimator_s"] / total["batches"])
        assert entry["sparse/mlp_kept_frac"] == pytest.approx((48 + 24) / 192)
        assert entry["sparse/attn_kept_frac"] == 0.5
        local_fracs.append(counts[0]["dense_tokens"] / counts[0]["tokens"])
    assert local_fracs != [h["sparse/dense_token_frac"] for h in logs[1:]]  # rank 0's own share differs
    # Every rank holds the same summed entries; only the main process reports them.
    stats = [[{k: v for k, v in h.items() if k.startswith("sparse/")} for h in r["log_history"]] for r in ranks]
    assert stats[0] == stats[1]


def _traceback_end(err: str, rank: int) -> str:
    return [line for line in err.splitlines() if line.startswith(f"[rank{rank}]:")][-1]


def test_one_rank_with_a_bad_estimator_file_ends_every_rank_with_its_message(tmp_path, monkeypatch):
    from ddp_scripts import steps

    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))
    good = _estimator_file(tmp_path, steps.CONFIG, steps.tiny_model())
    bad = tmp_path / "bad-estimator.safetensors"
    bad.write_bytes(b"not safetensors at all" * 4)
    port = str(_free_port())
    logs = [tmp_path / f"rank{r}" for r in range(2)]
    procs = [_start([sys.executable, str(SCRIPTS / "estimator_error.py"), str(good), str(bad), str(tmp_path / "c")],
                    _env(tmp_path, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port), log) for r, log in enumerate(logs)]
    (code0, out0, err0), (code1, out1, err1) = _wait(procs, logs, timeout=150)
    # The cache path: rank 0 (first in turn) fails; rank 1, waiting for its turn, gets the message.
    assert "cache turn: EstimatorUnavailableError: no estimator found" in out0, out0 + err0[-2000:]
    assert "cache turn: RankFailedError: rank 0 failed: EstimatorUnavailableError: no estimator found" in out1
    # An explicit file, bad on rank 1 only: rank 1 raises its own error, rank 0 the same message.
    assert code0 != 0 and code1 != 0
    assert "sparsified" not in out0 + out1
    # The traceback's last line (torch prefixes "[rankN]: " to its lines); the C++ runtime may
    # print a teardown line ("terminate called without an active exception") after it.
    assert "EstimatorFileError" in err1 and str(bad) in _traceback_end(err1, 1), err1[-2000:]
    last = _traceback_end(err0, 0)
    assert "sparse_unsloth.distributed.RankFailedError: rank 1 failed: EstimatorFileError" in last, err0[-2000:]
    assert str(bad) in last


def test_fsdp_is_refused_with_the_fix(tmp_path, monkeypatch):
    import torch.distributed as dist
    from helpers import tiny_lora_model
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))
    config = su.SparseConfig(mlp={0: 0.5}, estimator_rank=4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        sharded = tiny_lora_model(dtype=torch.float32)
        fully_shard(sharded.base_model.model.model.layers[0])
        with pytest.raises(NotImplementedError, match=r"the model is wrapped in FSDP.*Train with DDP"):
            su.sparsify(sharded, config, progress=False)
    finally:
        dist.destroy_process_group()
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(NotImplementedError, match="accelerate launch --use_fsdp"):
            su.sparsify(tiny_lora_model(), config, progress=False)
    model = su.sparsify(tiny_lora_model(), config, progress=False)
    args = type("Args", (), {"fsdp": "full_shard"})()  # what TrainingArguments(fsdp=...) carries
    with pytest.raises(NotImplementedError, match="TrainingArguments.fsdp='full_shard'"):
        su.SparsityCallback(model).on_train_begin(args, TrainerState(max_steps=4), TrainerControl())


def test_several_processes_without_a_process_group_are_told_the_order(monkeypatch, tmp_path):
    from helpers import tiny_lora_model

    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="Create the SFTConfig / TrainingArguments before calling sparsify"):
        su.sparsify(tiny_lora_model(), su.SparseConfig(mlp={0: 0.5}, estimator_rank=4), progress=False)
