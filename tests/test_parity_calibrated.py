"""scripts/parity_calibrated.py: the ARC-Easy rows (LLM-Adapters format) parse into question, choices, gold."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from parity_calibrated import arc_item

ROW = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                      "Answer1: oxygen Answer2: carbon dioxide Answer3: helium\n\n"
                      "Answer format: answer1/answer2/answer3",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}


def test_arc_row_parses():
    assert arc_item(ROW) == ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], 1)


def test_a_gold_outside_the_choices_is_an_error():
    with pytest.raises(ValueError, match="cannot parse"):
        arc_item({**ROW, "answer": "answer5"})


def test_finished_runs_kept_on_one_machine_resume_on_another(tmp_path):
    """What --keep copies as runs finish seeds --resume-from's work folder elsewhere: those runs
    are found finished (summary there); an ARC run kept without its accuracy is trained again."""
    from parity_calibrated import keep_run, resume_from

    work_a, kept, work_b = tmp_path / "a", tmp_path / "kept", tmp_path / "b"
    for run, files in {"dense-gsm8k": {"summary.json": '{"eval_loss": 0.69}', "adapter.bin": "weights",
                                       "provenance.json": '{"commit": "abc"}'},
                       "dense-arc": {"summary.json": "{}", "arc_easy_acc.json": "0.66"},
                       "sparse-gsm8k": {"summary.json": '{"eval_loss": 0.70}'},
                       "sparse-arc": {"summary.json": "{}"}}.items():
        (work_a / run).mkdir(parents=True)
        for name, text in files.items():
            (work_a / run / name).write_text(text)
        keep_run(work_a / run, kept)
    # one small file a run (a device call brings back 8 files at most), summaries only, no weights
    assert sorted(f.name for f in kept.iterdir()) == [f"{r}.json" for r in
                                                      ("dense-arc", "dense-gsm8k", "sparse-arc", "sparse-gsm8k")]
    assert "weights" not in (kept / "dense-gsm8k.json").read_text()
    assert resume_from(kept, work_b) == ["dense-arc", "dense-gsm8k", "sparse-gsm8k"]
    assert (work_b / "dense-gsm8k" / "summary.json").read_text() == '{"eval_loss": 0.69}'
    assert (work_b / "dense-arc" / "arc_easy_acc.json").read_text() == "0.66"
    assert (work_b / "dense-gsm8k" / "provenance.json").read_text() == '{"commit": "abc"}'   # where it was trained
    assert not (work_b / "sparse-arc").exists()
    assert resume_from(None, work_b) == [] and resume_from(tmp_path / "missing", work_b) == []


def test_a_missing_resume_folder_is_an_error(tmp_path, capsys):
    """A mistyped --resume-from must not quietly train every run again."""
    from parity_calibrated import main

    with pytest.raises(SystemExit):
        main(["--config", "dense", "--gsm8k-dir", str(tmp_path), "--arc-dir", str(tmp_path),
              "--resume-from", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert "--resume-from" in err and "no such folder" in err


def test_a_finished_run_of_another_config_is_refused_not_reused(tmp_path):
    """A preset recalibrated between two calls keeps its name: the run folder's config record, not
    the name, says whether the finished run can stand for it."""
    from types import SimpleNamespace

    from parity_calibrated import _config_record, train

    run = tmp_path / "sparse-gsm8k"
    run.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n" * 12)
    done = {"eval_loss": 0.7, "steps": 10, "eval_rows": 2, "train_rows": 10}
    (run / "summary.json").write_text(json.dumps(done))
    args = SimpleNamespace()
    with pytest.raises(SystemExit, match="another config"):       # no record: an older run
        train(args, "smollm2-135m-safe", str(rows), 10, 2, run, 0)
    (run / "config.json").write_text(json.dumps(_config_record("smollm2-135m")))
    with pytest.raises(SystemExit, match="another config"):
        train(args, "smollm2-135m-safe", str(rows), 10, 2, run, 0)
    (run / "config.json").write_text(json.dumps(_config_record("smollm2-135m-safe")))
    assert train(args, "smollm2-135m-safe", str(rows), 10, 2, run, 0) == done


def test_a_finished_run_of_other_steps_or_rows_is_refused_not_reused(tmp_path):
    """Runs kept in the repository outlive the command that trained them: a dry run with fewer
    steps or rows must not pass them off as its own (nor the reverse)."""
    from types import SimpleNamespace

    from parity_calibrated import _config_record, train

    run = tmp_path / "dense-gsm8k"
    run.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n" * 12)
    (run / "summary.json").write_text(json.dumps({"steps": 10, "eval_rows": 2, "train_rows": 10}))
    (run / "config.json").write_text(json.dumps(_config_record("dense")))
    for steps, eval_rows in ((5, 2), (10, 3)):
        with pytest.raises(SystemExit, match="another geometry"):
            train(SimpleNamespace(), "dense", str(rows), steps, eval_rows, run, 0)
    rows.write_text("{}\n" * 20)                                   # other training rows
    with pytest.raises(SystemExit, match="another geometry"):
        train(SimpleNamespace(), "dense", str(rows), 10, 2, run, 0)


def test_the_noise_floor_runs_dense_twice_in_folders_of_their_own():
    """``--config dense --sparse-seed 1``: dense against dense with another seed, in folders that a
    finished seed-0 run of a sparse config can never stand for."""
    from parity_calibrated import run_plan

    assert run_plan("smollm2-135m-calibrated", 0, 0) == [("dense", "dense", 0, "dense"),
                                                         ("sparse", "smollm2-135m-calibrated", 0, "sparse")]
    assert run_plan("dense", 0, 1) == [("dense", "dense", 0, "dense"), ("sparse", "dense", 1, "sparse-seed1")]


def test_the_committed_parity_runs_resume_as_finished(tmp_path):
    """The runs kept in benchmarks/results/parity_runs/ are what the next device session does not
    train again: each resumes with its summary, config record and provenance (an ARC run with its
    accuracy), trained with the parity's default steps."""
    from parity_calibrated import resume_from

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "parity_runs"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert folders
    for folder in folders:
        work = tmp_path / folder.name
        seeded = resume_from(folder, work)
        assert sorted(seeded) == sorted(p.stem for p in folder.glob("*.json"))
        for run in seeded:
            summary = json.loads((work / run / "summary.json").read_text())
            assert summary["steps"] == (250 if run.endswith("-gsm8k") else 282)
            provenance = json.loads((work / run / "provenance.json").read_text())
            assert provenance["commit"] and provenance["device"] and provenance["command"]
            assert (work / run / "config.json").is_file()
            if run.endswith("-arc"):
                assert 0 < json.loads((work / run / "arc_easy_acc.json").read_text()) < 1


def test_the_noise_floor_config_dense_has_a_flop_fraction_of_one():
    """``--config dense`` (the noise-floor runs) reaches the result's FLOP count after four trained
    runs: "dense" is no preset name, so it must not go through the preset lookup there."""
    from parity_calibrated import sparse_config
    from transformers import LlamaConfig

    from sparse_unsloth import flop_fraction, load_config

    shape = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                        num_key_value_heads=2)
    assert flop_fraction(sparse_config("dense"), shape, 8, 100, 50) == 1.0
    assert sparse_config("smollm2-135m-safe") == load_config("smollm2-135m-safe")


def test_runs_train_at_once_with_jobs_and_one_at_a_time_without():
    """--jobs 2: two runs are in flight together (each waits for a second at a barrier, which
    breaks when it is alone); --jobs 1 never has two."""
    import threading

    from parity_calibrated import run_all, run_plan

    plan = run_plan("smollm2-135m-safe", 0, 0)
    together = threading.Barrier(2, timeout=5)

    def meets(folder, task, config, seed):
        together.wait()
        return folder, task, config

    results = run_all(plan, meets, jobs=2)
    assert results == {(f, t): (f, t, c) for _, c, _, f in plan for t in ("gsm8k", "arc")}
    lock, running, most = threading.Lock(), [0], [0]

    def counts(folder, task, config, seed):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1

    run_all(plan, counts, jobs=1)
    assert most[0] == 1


def test_a_failed_run_lets_the_others_finish_and_names_itself():
    """Runs trained at once: one that fails must not lose the others' device time."""
    from parity_calibrated import run_all, run_plan

    finished = []

    def finish(folder, task, config, seed):
        if (folder, task) == ("dense", "arc"):
            raise RuntimeError("CUDA out of memory")
        finished.append(f"{folder}-{task}")

    with pytest.raises(SystemExit, match=r"1 of 4 runs failed \(dense-arc\); those that finished are kept.*out of memory"):
        run_all(run_plan("smollm2-135m-safe", 0, 0), finish, jobs=4)
    assert sorted(finished) == ["dense-gsm8k", "sparse-arc", "sparse-gsm8k"]


def test_jobs_outside_one_to_four_is_an_error(tmp_path, capsys):
    from parity_calibrated import main

    for jobs in ("0", "5"):
        with pytest.raises(SystemExit):
            main(["--config", "dense", "--gsm8k-dir", str(tmp_path), "--arc-dir", str(tmp_path), "--jobs", jobs])
        assert "--jobs" in capsys.readouterr().err


def test_the_device_call_of_both_chains_names_each_missing_carry_before_training(tmp_path):
    """A device machine idle for 30 s is replaced by a bare one: `both` must say which carried input
    is not on this machine (and which carry brings it) instead of training on nothing."""
    import os
    import subprocess

    smollm2 = tmp_path / "m.gguf"
    smollm2.write_bytes(b"GGUF")                       # present: only the others are named
    script = Path(__file__).resolve().parents[1] / "scripts" / "device_parity_calibrated.sh"
    env = {**os.environ, "PARITY_DATA": str(tmp_path / "no-data"), "PARITY_LOGS": str(tmp_path / "logs"),
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # no site: no unsloth
    (tmp_path / "python3").chmod(0o755)
    r = subprocess.run(["bash", str(script), "both", str(smollm2), str(tmp_path / "q.gguf")],
                       check=False, env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    missing = [line for line in r.stderr.splitlines() if line.startswith("both: missing")]
    assert len(missing) == 3, r.stderr
    assert "q.gguf (carry .q1 .. .q9" in missing[0]
    assert "no-data (carry .parity_data" in missing[1]
    assert "unsloth (carry .whl" in missing[2]
    assert str(smollm2) not in r.stderr
    assert not (tmp_path / "logs").exists()           # nothing started
