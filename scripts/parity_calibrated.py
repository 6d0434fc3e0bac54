#!/usr/bin/env python3
"""Accuracy parity of a calibrated config: dense vs sparse, same seed and steps, through the user's path.

Each of four runs is ``sparse-unsloth train`` (a subprocess, ``--unsloth`` on a GPU):

1. GSM8K: LoRA r 16 on all projections, ``--steps`` x ``--batch`` on the first ``--train-rows``
   train rows; held-out answer-token loss on the first ``--eval-rows`` test rows (computed dense).
2. ARC-Easy: a fresh adapter, ``--arc-epochs`` epochs on the train split (prompt
   ``"Question: q\\nAnswer:"``, completion the gold choice's text); accuracy on the test split
   by the summed log-probability of each choice's text (as lm-eval-harness's ``acc``).

Both dense and with ``--config``; writes ``benchmarks/results/<name>.json`` with
``metrics.{dense,sparse}.{eval_loss,arc_easy_acc}``, the config's ``flop_fraction`` at the
GSM8K batch geometry and, with ``--reference-config``, that config's as ``reference_flop_fraction``.
Data come from folders given on the command line (the GPU machine gets them through the working
tree): ``--gsm8k-dir`` with ``train.jsonl``/``test.jsonl`` ({question, answer}) and ``--arc-dir``
with the LLM-Adapters ``train.json``/``test.json`` of ARC-Easy.

    python scripts/parity_calibrated.py --model smollm2 --config smollm2-135m-calibrated \\
        --reference-config smollm2-135m-safe --gsm8k-dir .parity_data/gsm8k --arc-dir .parity_data/ARC-Easy \\
        --name parity_smollm2_calibrated
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CHOICE = re.compile(r"(?:^|\s)Answer(\d+):\s*")


def arc_item(row: dict) -> tuple[str, list[str], int]:
    """(question, choices, gold index) of an LLM-Adapters ARC row ("...\\n\\nAnswer1: a Answer2: b ...")."""
    body = row["instruction"].split("\n\nAnswer format")[0]
    head, _, options = body.partition("\n\n")
    question = head.split(":", 1)[1].strip() if ":" in head else head.strip()
    parts = _CHOICE.split(options)          # ['', '1', 'text', '2', 'text', ...]
    choices = [parts[i].strip() for i in range(2, len(parts), 2)]
    gold = int(re.sub(r"\D", "", row["answer"])) - 1
    if not choices or not 0 <= gold < len(choices):
        raise ValueError(f"cannot parse ARC row: {row['instruction'][:120]!r}")
    return question, choices, gold


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def sparse_config(config: str):
    """The :class:`SparseConfig` of ``config``; "dense" (the noise-floor runs) is one with no sparse layer."""
    from sparse_unsloth import SparseConfig, load_config

    return SparseConfig(name="dense") if config == "dense" else load_config(config)


def _config_record(config: str) -> str | dict:
    """What a run trained with: a preset's name says nothing of the version it had then."""
    return "dense" if config == "dense" else json.loads(json.dumps(sparse_config(config).to_dict()))   # as stored


def run_plan(config: str, seed: int, sparse_seed: int) -> list[tuple[str, str, int, str]]:
    """(label, config, seed, run folder prefix) of the dense and the ``config`` runs. A run's folder
    names its seed when it is not ``seed``: a finished run is reused by its folder."""
    folder = "sparse" if sparse_seed == seed else f"sparse-seed{sparse_seed}"
    return [("dense", "dense", seed, "dense"), ("sparse", config, sparse_seed, folder)]


def train(args, config: str, dataset: str, steps: int, eval_rows: int, out: Path, seed: int) -> dict:
    """One ``sparse-unsloth train`` run; its summary.json (reused when there and trained with the
    same config: a rerun resumes)."""
    want = _config_record(config)
    if (out / "summary.json").is_file():
        had = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else None
        if had != want:
            raise SystemExit(f"{out} holds a finished run of another config than {config!r} (recalibrated "
                             "since?): delete that folder (and its kept copy, <run>.json in benchmarks/results/parity_runs/) "
                             "to train it again")
        done = json.loads((out / "summary.json").read_text())
        rows = len(Path(dataset).read_text().splitlines())
        want_shape = {"steps": steps, "eval_rows": eval_rows, "train_rows": rows - eval_rows}
        had_shape = {k: done.get(k) for k in want_shape}
        if had_shape != want_shape:
            raise SystemExit(f"{out} holds a finished run of another geometry ({had_shape}) than asked "
                             f"({want_shape}): delete that folder (and its kept copy in "
                             "benchmarks/results/parity_runs/) to train it again, or ask for the same settings")
        return done
    cmd = [sys.executable, "-m", "sparse_unsloth.cli", "train", "--model", args.model, "--dataset", dataset,
           "--config", config, "--steps", str(steps), "--batch-size", str(args.batch), "--lr", str(args.lr),
           "--lora-r", str(args.lora_r), "--max-length", str(args.max_length), "--eval-rows", str(eval_rows),
           "--seed", str(seed), "--output-dir", str(out), "--logging-steps", "25", "--no-progress"]
    if args.unsloth:
        cmd.append("--unsloth")
    print(f"[{out.name}] $ " + shlex.join(cmd), flush=True)
    # Each run compiles into its own folder: Unsloth writes its generated modules to one fixed
    # folder, and runs going at once (--jobs) would overwrite each other's half-written files.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "UNSLOTH_COMPILE_LOCATION": str(out.resolve() / "unsloth_compiled_cache")}
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:          # runs at once interleave: each line names its run
            print(f"[{out.name}] {line}", end="", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    (out / "config.json").write_text(json.dumps(want) + "\n")
    (out / "provenance.json").write_text(json.dumps({**_provenance(), "command": shlex.join(cmd),
                                                     "jobs": args.jobs}) + "\n")
    return json.loads((out / "summary.json").read_text())


def _provenance() -> dict:
    """Where and from what a run was trained: a result may gather runs of several machines and sessions."""
    import torch

    return {"commit": os.environ.get("BENCH_COMMIT") or _commit(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": datetime.date.today().isoformat()}


# what a finished run leaves that the result reads
_FINISHED = ("summary.json", "config.json", "arc_easy_acc.json", "provenance.json")


def resume_from(carried: Path | None, work: Path) -> list[str]:
    """Seed ``work`` with the finished runs kept in ``carried`` (by :func:`keep_run` on another
    machine: a device call cut by its limit, or an earlier session), so that they are not trained
    again; returns their names. An ARC run counts as finished only with its accuracy: its adapter
    is not kept, so it could not be scored again."""
    if carried is None or not carried.is_dir():
        return []
    seeded = []
    for kept in sorted(carried.glob("*.json")):
        files = json.loads(kept.read_text())
        if "summary.json" not in files or (kept.stem.endswith("-arc") and "arc_easy_acc.json" not in files):
            continue
        run = work / kept.stem
        run.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            if not (run / name).is_file():          # what this machine has wins
                (run / name).write_text(text)
        seeded.append(kept.stem)
    return seeded


def keep_run(run_dir: Path, keep: Path | None) -> None:
    """The files of a finished run that the result reads (``_FINISHED``: a few KB, no weights), as
    one file ``keep``/<run>.json: a device call brings back at most 8 files, and 3 a run for 4
    runs were more (the sparse summaries of the tenth session's parity did not come back)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        files = {name: (run_dir / name).read_text() for name in _FINISHED if (run_dir / name).is_file()}
        (keep / f"{run_dir.name}.json").write_text(json.dumps(files) + "\n")


def run_all(plan: list[tuple[str, str, int, str]], finish, jobs: int) -> dict:
    """``finish(folder, task, config, seed)`` of each run of ``plan`` (GSM8K and ARC), ``jobs`` at
    once: {(folder, task): what it returned}. On a GPU one run leaves it idle most of the time
    (its steps are host-bound), so runs at once cost little more than one. A failed run does not
    stop the others: every run that can finish is kept before the first error is raised."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {(folder, task): pool.submit(finish, folder, task, config, seed)
                   for _, config, seed, folder in plan for task in ("gsm8k", "arc")}
        wait(futures.values())
    failed = [key for key, f in futures.items() if f.exception() is not None]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(futures)} runs failed ({', '.join('-'.join(k) for k in failed)}); "
                         f"those that finished are kept. The first error: {futures[failed[0]].exception()!r}")
    return {key: f.result() for key, f in futures.items()}


def arc_accuracy(model_path: str, adapter: str, items: list[tuple[str, list[str], int]]) -> float:
    """Share of questions whose gold choice has the highest summed log-probability."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, adapter).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hits = 0
    with torch.no_grad():
        for question, choices, gold in items:
            ctx = tok(_prompt(question))["input_ids"]
            conts = [tok(_prompt(question) + " " + c)["input_ids"][len(ctx):] for c in choices]
            width = len(ctx) + max(map(len, conts))
            ids = torch.full((len(choices), width), pad)
            mask = torch.zeros_like(ids)
            for i, cont in enumerate(conts):
                ids[i, :len(ctx) + len(cont)] = torch.tensor(ctx + cont)
                mask[i, :len(ctx) + len(cont)] = 1
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            scores = [float(logp[i, torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c)), torch.tensor(c)].sum())
                      for i, c in enumerate(conts)]
            hits += int(max(range(len(scores)), key=scores.__getitem__) == gold)
    return hits / len(items)


def geometry(model_path: str, rows: list[dict], max_length: int) -> tuple[int, int]:
    """(mean tokens, mean output tokens) of the GSM8K training rows, as the trainer cuts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    total = out = 0
    for r in rows:
        prompt = len(tok(_prompt(r["question"].strip()))["input_ids"])
        full = min(len(tok(_prompt(r["question"].strip()) + " " + r["answer"].strip())["input_ids"]) + 1,
                   max_length)
        total, out = total + full, out + max(full - prompt, 0)
    return round(total / len(rows)), round(out / len(rows))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a model folder, or a .gguf (Qwen2.5-0.5B)")
    p.add_argument("--config", required=True, help="the calibrated config (YAML or preset)")
    p.add_argument("--reference-config", help="a config whose flop_fraction is reported alongside")
    p.add_argument("--gsm8k-dir", type=Path, required=True)
    p.add_argument("--arc-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--eval-rows", type=int, default=500)
    p.add_argument("--arc-epochs", type=int, default=2)
    p.add_argument("--arc-train-rows", type=int, default=0, help="0: all (fewer: a dry run of the script)")
    p.add_argument("--arc-test-rows", type=int, default=0, help="0: all")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparse-seed", type=int, help="the --config runs' seed (default: --seed). With --config "
                                                  "dense and another seed: two dense runs, the noise floor "
                                                  "that a sparse run's differences are read against")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (1-4); their step times then "
                                                      "measure nothing (the result says how many ran at once)")
    p.add_argument("--unsloth", action=argparse.BooleanOptionalAction, default=None,
                   help="train through Unsloth (default: when a CUDA GPU is there)")
    p.add_argument("--name", default="parity_calibrated")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, help="where the runs go; finished runs found there are reused, so a "
                                            "call cut by a time limit resumes (default: a temporary folder)")
    p.add_argument("--keep", type=Path, help="copy each finished run's summary here as it finishes (the "
                                            "device's $OUT: it comes back even from a call cut by its limit)")
    p.add_argument("--resume-from", type=Path, help="a folder --keep wrote on another machine: its finished "
                                                   "runs are not trained again (a chain split over sessions)")
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 4:
        p.error(f"--jobs {args.jobs}: a parity has four runs; give 1 to 4")
    if args.resume_from is not None and not args.resume_from.is_dir():
        # a mistyped folder would silently train every run again, at the cost of device time
        p.error(f"--resume-from {args.resume_from}: no such folder (it is what --keep wrote on the earlier "
                "machine: copy that folder here first)")

    import torch

    from sparse_unsloth import flop_fraction
    from sparse_unsloth.finetune import resolve_model

    if args.unsloth is None:
        args.unsloth = torch.cuda.is_available()
    model_path = resolve_model(args.model)
    train_rows = _read_jsonl(args.gsm8k_dir / "train.jsonl", args.train_rows)
    test_rows = _read_jsonl(args.gsm8k_dir / "test.jsonl", args.eval_rows)
    arc_train = [arc_item(r) for r in json.loads((args.arc_dir / "train.json").read_text())]
    arc_train = arc_train[:args.arc_train_rows] if args.arc_train_rows else arc_train
    arc_test = [arc_item(r) for r in json.loads((args.arc_dir / "test.json").read_text())]
    arc_test = arc_test[:args.arc_test_rows] if args.arc_test_rows else arc_test
    arc_steps = -(-args.arc_epochs * len(arc_train) // args.batch)
    work = args.work or Path(tempfile.mkdtemp(prefix="parity-"))
    work.mkdir(parents=True, exist_ok=True)
    seeded = resume_from(args.resume_from, work)
    if seeded:
        print(f"resumed finished runs from {args.resume_from}: {', '.join(seeded)}", flush=True)
    # sparse-unsloth train holds out a local file's last --eval-rows rows: the test rows go last.
    gsm8k = _jsonl([{"question": r["question"], "answer": r["answer"]} for r in train_rows + test_rows],
                   work / "gsm8k.jsonl")
    arc = _jsonl([{"prompt": _prompt(q), "completion": " " + c[g]} for q, c, g in arc_train], work / "arc.jsonl")
    sparse_seed = args.seed if args.sparse_seed is None else args.sparse_seed
    plan = run_plan(args.config, args.seed, sparse_seed)

    def finish(folder: str, task: str, config: str, seed: int) -> tuple[dict, float | None]:
        """One run trained (or found finished), ARC scored, kept: (its summary, its ARC accuracy)."""
        run_dir = work / f"{folder}-{task}"
        # a resumed run is kept where it came from already (and a device call brings back 8 files)
        keep = None if run_dir.name in seeded else args.keep
        if task == "gsm8k":
            run = train(args, config, gsm8k, args.steps, len(test_rows), run_dir, seed)
            keep_run(run_dir, keep)
            return run, None
        run = train(args, config, arc, arc_steps, 0, run_dir, seed)
        acc_file = run_dir / "arc_easy_acc.json"
        if not acc_file.is_file():
            acc_file.write_text(json.dumps(arc_accuracy(model_path, run["adapter_dir"], arc_test)))
        keep_run(run_dir, keep)
        return run, json.loads(acc_file.read_text())

    results = run_all(plan, finish, args.jobs)
    metrics, provenance = {}, {}
    for label, _, _, folder in plan:
        run, _ = results[(folder, "gsm8k")]
        arc_run, acc = results[(folder, "arc")]
        for task in ("gsm8k", "arc"):
            kept = work / f"{folder}-{task}" / "provenance.json"
            provenance[f"{folder}-{task}"] = json.loads(kept.read_text()) if kept.is_file() else None
        metrics[label] = {"eval_loss": run["eval_loss"], "arc_easy_acc": acc, "train_s": run["train_s"],
                          "step_s_median": run.get("step_s") and sorted(run["step_s"])[len(run["step_s"]) // 2],
                          "losses": run["losses"], "sparse_logs": run["sparse_logs"][-2:],
                          "arc_train_s": arc_run["train_s"], "arc_losses": arc_run["losses"],
                          # every step's time (synchronized clock): the sparse run's dense warm-up
                          # steps against the dense run's, and its sparse steps against both
                          "step_s": run.get("step_s"), "arc_step_s": arc_run.get("step_s")}
        print(f"{folder}: GSM8K held-out loss {run['eval_loss']:.4f}, ARC-Easy {100 * acc:.2f}%", flush=True)
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(model_path)
    seq, outputs = geometry(model_path, train_rows, args.max_length)
    geo = (args.batch, seq, outputs)
    rel = metrics["sparse"]["eval_loss"] / metrics["dense"]["eval_loss"] - 1
    points = 100 * (metrics["sparse"]["arc_easy_acc"] - metrics["dense"]["arc_easy_acc"])
    result = {
        "name": args.name,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        **_provenance(),                # commit, device, date of this call
        "settings": {"model": args.model, "config": args.config, "steps": args.steps, "batch": args.batch,
                     "train_rows": len(train_rows), "eval_rows": len(test_rows), "arc_train_rows": len(arc_train),
                     "arc_steps": arc_steps,
                     "arc_test_rows": len(arc_test), "max_length": args.max_length, "lr": args.lr,
                     "lora_r": args.lora_r, "seed": args.seed, "sparse_seed": sparse_seed, "unsloth": args.unsloth,
                     "jobs": args.jobs,      # runs trained at once: above 1, step times are not the runs' own
                     "flop_geometry": {"batch": geo[0], "seq_len": seq, "output_tokens": outputs}},
        "resumed_runs": seeded,      # trained on an earlier machine (their summaries carried here)
        "run_provenance": provenance,   # per run: commit, device, date (None: kept before it was recorded)
        "baseline": "dense",
        "metrics": metrics,
        "flop_fraction": flop_fraction(sparse_config(args.config), shape, *geo, lora_r=args.lora_r),
        "eval_loss_rel_diff": rel,
        "arc_easy_points_diff": points,
        "goal": "held-out GSM8K loss within 1% of dense and ARC-Easy accuracy within 1 point",
        "goal_met": abs(rel) <= 0.01 and abs(points) <= 1.0,
    }
    if args.reference_config:
        result["reference_config"] = args.reference_config
        result["reference_flop_fraction"] = flop_fraction(sparse_config(args.reference_config), shape, *geo,
                                                          lora_r=args.lora_r)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"loss {100 * rel:+.2f}%, ARC-Easy {points:+.2f} points, flop_fraction {result['flop_fraction']:.3f}"
          f" -> {path}")
    return result


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
