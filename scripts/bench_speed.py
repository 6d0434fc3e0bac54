#!/usr/bin/env python3
"""Training-step speed of sparse LoRA in Unsloth vs Unsloth's dense LoRA and HF PEFT LoRA (one GPU).

Llama-3-8B shape (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, 32 layers) with random
bf16 weights and a local tokenizer (no hub); LoRA r=16, alpha 16 on all 7 projections; batch
8 x 512 with labels -100 before the last 128 positions of each row (``--batch``, ``--seq``,
``--output-tokens``); bf16 autocast; AdamW on the LoRA parameters; CUDA-event median over timed
steps after warm-up. ``--load-in-4bit``: the same model as NF4 (double-quantized) QLoRA, in all
three runs (HF PEFT as TRL's QLoRA recipe: bitsandbytes 4-bit + LoRA, no k-bit preparation).

The shape matrix of the speed issue, one device call each (results named after the case):
  (a) the paper's setting                       -> speed_bf16_llama3-8b.json
  (b) --batch 4 --seq 1024 --output-tokens 256  -> speed_bf16_llama3-8b_4x1024.json
  (c) --preset llama3-8b-csr                    -> speed_bf16_llama3-8b_csr.json
  QLoRA: --load-in-4bit                         -> speed_nf4_llama3-8b.json

The driver runs two children one after the other:
  peft     (unsloth never imported, transformers unpatched): builds and saves the model, then
           times HF PEFT LoRA (sdpa, non-reentrant gradient checkpointing): the paper's baseline.
  unsloth  FastLanguageModel.from_pretrained + get_peft_model (Unsloth's gradient checkpointing
           and compiled decoder blocks), times the dense step, then sparsify(model, preset) and
           times the sparse step in the same process; the estimator's GPU time alone (CUDA
           events: estimator_seconds); a
           torch.profiler pass of each (per-op summary).
then writes the result JSON (DESIGN.md's format) and a PNG plot.

    PYTHONUNBUFFERED=1 python scripts/bench_speed.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import bisect
import collections
import datetime
import json
import os
import subprocess
import sys

for _k, _v in {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HID, INTER, HEADS, KV_HEADS, VOCAB, THETA = 4096, 14336, 32, 8, 128256, 500000.0
RANK, ALPHA = 16, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_PRESET = "llama3-8b-math10k"


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# shared by the children
# ---------------------------------------------------------------------------------------------
def result_name(args) -> str:
    """``speed_<bf16|nf4>_llama3-8b`` plus the geometry and preset where they differ from (a)."""
    name = f"speed_{'nf4' if args.load_in_4bit else 'bf16'}_llama3-8b"
    if (args.batch, args.seq, args.output_tokens) != (8, 512, 128):
        name += f"_{args.batch}x{args.seq}" + (f"_out{args.output_tokens}" if args.output_tokens * 4 != args.seq else "")
    if args.preset != DEFAULT_PRESET:
        name += "_" + args.preset.removeprefix("llama3-8b-")
    return name


def make_batch(args):
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, VOCAB, (args.batch, args.seq), generator=gen)
    labels = ids.clone()
    labels[:, :args.seq - args.output_tokens] = -100
    return ids.cuda(), labels.cuda()


def make_step(model, opt, ids, labels):
    import torch

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def time_steps(step, warmup: int, timed: int, tokens: int) -> dict:
    """Median CUDA-event step time after ``warmup`` steps, and each step's host time: how long
    the host took to issue it, any wait for the GPU inside the step included (``host_times_s``).
    A step that ends barely after its host is done was paced by the host; hosts differ
    (benchmarks/NOTES.md, sixth 2026-12-06 session), and this tells a slow host's steps apart."""
    import statistics
    import time

    import torch

    losses = [float(step()) for _ in range(warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    pauses = GCPauses()
    before = torch.cuda.memory_stats()
    for _ in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        loss = step()
        end.record()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        losses.append(float(loss))
    pauses.close()
    after = torch.cuda.memory_stats()
    med = statistics.median(times)
    return {"step_s_median": round(med, 5), "step_s_min": round(min(times), 5),
            "step_s_max": round(max(times), 5), "tokens_per_s": round(tokens / med, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "step_times_s": [round(t, 5) for t in times], "host_times_s": [round(t, 5) for t in host],
            "losses": [round(x, 4) for x in losses],
            "gc": pauses.summary(timed),
            # cudaMalloc/cudaFree calls during the timed steps (each cudaFree synchronizes the device)
            "allocator": {k: after.get(k, 0) - before.get(k, 0)
                          for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}}


class GCPauses:
    """Python's garbage-collector pauses while alive (``gc.callbacks``): a collection of the old
    generation scans every tracked object of the process (the model's, Dynamo's), and stops the
    host, which issues the GPU's work, for as long."""

    def __init__(self) -> None:
        import gc
        import time

        self.clock, self.start, self.pauses = time.perf_counter, 0.0, []
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.start = self.clock()
        else:
            self.pauses.append((info["generation"], self.clock() - self.start))

    def close(self) -> None:
        import gc

        gc.callbacks.remove(self._on)          # bound methods of one object compare equal

    def summary(self, steps: int) -> dict:
        by_gen = {g: [t for gen, t in self.pauses if gen == g] for g in (0, 1, 2)}
        return {"s_per_step": round(sum(t for _, t in self.pauses) / steps, 5),
                "collections": {f"gen{g}": len(ts) for g, ts in by_gen.items()},
                "max_pause_s": {f"gen{g}": round(max(ts, default=0.0), 5) for g, ts in by_gen.items()}}


def phase_times(model, opt, ids, labels, n: int = 5) -> dict:
    """Host vs GPU, forward and backward apart: the host's time to issue each phase and the
    GPU's time for it (CUDA events), and how long the GPU still ran after the host had issued the
    whole backward (``bwd_gpu_tail_s``: near 0 when the host is the bottleneck). Medians of ``n``
    steps, each synchronized at its end (the loss already synchronizes after the forward)."""
    import statistics
    import time

    import torch

    rows = []
    for _ in range(n):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        events[1].record()
        t1 = time.perf_counter()
        loss.backward()
        events[2].record()
        t2 = time.perf_counter()
        events[2].synchronize()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"host_fwd_s": t1 - t0, "host_bwd_s": t2 - t1, "bwd_gpu_tail_s": t3 - t2,
                     "gpu_fwd_s": events[0].elapsed_time(events[1]) / 1e3,
                     "gpu_bwd_s": events[1].elapsed_time(events[2]) / 1e3})
    return {k: round(statistics.median(r[k] for r in rows), 5) for k in rows[0]}


HOST_OP_PREFIXES = ("sparse_unsloth::", "unsloth::", "su::", "cudaGraphLaunch", "aten::copy_", "aten::clone",
                    "aten::mm", "aten::addmm", "aten::index_select")
KERNEL_CATEGORIES = (
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("attention_core", ("sdpa", "flash", "fmha", "attention")),
    ("memcpy", ("memcpy", "memset")),
    ("index_gather_scatter", ("index", "gather", "scatter")),
    ("sort_topk", ("sort", "topk", "radix")),
    ("optimizer", ("optimizer", "adam", "foreach")),
    ("triton_fused", ("triton_", "_fg_kernel", "_dwf_", "rms_layernorm", "rope")),
    ("elementwise_reduce", ("elementwise", "reduce", "vectorized")),
)


def sync_points(step) -> dict:
    """Where one step synchronizes the host with the GPU (torch's sync debug mode), by source line."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return dict(where.most_common(12))


def pass_name(fn) -> str:
    """A sparse pass's name in the bench's reports: its function, ``/bwd`` when run inside backward
    (a recompute or a backward)."""
    import torch

    return fn.__name__ + ("/bwd" if torch._C._current_graph_task_id() != -1 else "")


class TaggedPasses:
    """While active, every pass the sparse functions run through the CUDA-graph runner (and every
    channel choice) is a named profiler range, ``su::<function>`` with ``/bwd`` for the passes run
    inside backward (recomputes and backwards), so the profile gives each its GPU time."""

    def __enter__(self):
        import torch

        from sparse_unsloth.ops.graphs import GraphRunner

        self.original = original = GraphRunner.__call__

        def tagged(runner, fn, *args, **kwargs):
            with torch.profiler.record_function(f"su::{pass_name(fn)}"):
                return original(runner, fn, *args, **kwargs)

        GraphRunner.__call__ = tagged
        return self

    def __exit__(self, *exc):
        from sparse_unsloth.ops.graphs import GraphRunner

        GraphRunner.__call__ = self.original


class HostClock:
    """While active, the host's time (``perf_counter``, no profiler: CUPTI inflates graph launches)
    inside each of our ops (``op <name>``, whole calls), each pass through the CUDA-graph runner
    (``pass <function>[/bwd]``: input copies, replay, output copies, bookkeeping) and each replay
    of a graph ``runner`` holds (``replay``)."""

    OPS = ("lora_mlp", "lora_mlp_backward", "lora_qkv", "lora_qkv_backward", "lora_o", "lora_o_backward")

    def __init__(self, runner=None) -> None:
        self.runner = runner

    def __enter__(self):
        import time

        from sparse_unsloth.ops.graphs import GraphRunner
        from sparse_unsloth.patch import unsloth_fast

        self.totals: dict = collections.defaultdict(lambda: [0.0, 0])
        clock, totals = time.perf_counter, self.totals

        def timed(name, fn):
            def run(*args, **kwargs):
                start = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    entry = totals[name]
                    entry[0] += clock() - start
                    entry[1] += 1
            return run

        self.restore = [(GraphRunner, "__call__", GraphRunner.__call__)]
        original = GraphRunner.__call__

        def runner_call(runner, fn, *args, **kwargs):
            return timed(f"pass {pass_name(fn)}", original)(runner, fn, *args, **kwargs)

        GraphRunner.__call__ = runner_call
        for name in self.OPS:
            fns = getattr(unsloth_fast, f"_{name}")._backend_fns
            for key, fn in list(fns.items()):
                self.restore.append((fns, key, fn))
                fns[key] = timed(f"op {name}", fn)
        for slot in getattr(self.runner, "_slots", {}).values():
            for graph in slot.graphs.values():
                self.restore.append((graph, "replay", graph.replay))
                graph.replay = timed("replay", graph.replay)
        return self

    def __exit__(self, *exc):
        for where, key, value in reversed(self.restore):
            if isinstance(where, dict):
                where[key] = value
            else:
                setattr(where, key, value)

    def summary(self, steps: int) -> dict:
        return {name: {"ms_per_step": round(1e3 * t / steps, 3), "calls_per_step": c // steps,
                       "us_per_call": round(1e6 * t / max(c, 1), 1)}
                for name, (t, c) in sorted(self.totals.items(), key=lambda kv: -kv[1][0])}


def host_clock(step, runner, n: int = 3) -> dict:
    """Per op, pass and replay, the host's time in ``n`` unprofiled steps (:class:`HostClock`), and
    the step's host time (to its last launch)."""
    import time

    import torch

    torch.cuda.synchronize()
    with HostClock(runner) as clock:
        start = time.perf_counter()
        for _ in range(n):
            step()
        host = (time.perf_counter() - start) / n
        torch.cuda.synchronize()
    return {"host_s_per_step": round(host, 5), "by_op_and_pass": clock.summary(n)}


def busy_union_s(intervals: list[tuple[int, int]]) -> float:
    """Seconds covered by the union of ``(start_ns, end_ns)`` intervals (overlapping streams count once)."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e9


def gpu_events(prof) -> list[tuple[int, int, str]]:
    """``(start_ns, end_ns, name)`` of every GPU-side event of the profile: kernels, copies, and the
    GPU spans of named ranges (``su::...``)."""
    return [(ev.start_ns(), ev.start_ns() + ev.duration_ns(), ev.name())
            for ev in prof.profiler.kineto_results.events()
            if ev.device_type().name == "CUDA" and ev.duration_ns() > 0]


def timeline(prof, n: int) -> dict:
    """From the kernel timeline: the GPU's busy time per step as the union of its kernels' spans
    (all work; compute alone, without the host<->device copies of Unsloth's activation offload,
    which run on a side stream beside compute). The step's real GPU idle is its time minus the
    compute union: the sum of kernel times counts overlapping streams twice."""
    spans, compute = [], []
    for start, end, name in gpu_events(prof):
        if name.startswith("su::"):
            continue
        spans.append((start, end))
        if "HtoD" not in name and "DtoH" not in name:
            compute.append((start, end))
    return {"gpu_union_s_per_step": round(busy_union_s(spans) / n, 5),
            "gpu_compute_union_s_per_step": round(busy_union_s(compute) / n, 5)}


def pass_kernels(prof, n: int, top: int = 40) -> dict:
    """Per sparse pass (``TaggedPasses``' ranges on the GPU), its ``top`` kernels: microseconds and
    launches per call of the pass. A kernel belongs to the innermost range whose GPU span holds it."""
    ranges, kernels = [], []
    for span in gpu_events(prof):
        (ranges if span[2].startswith("su::") else kernels).append(span)
    ranges.sort()
    starts = [r[0] for r in ranges]
    calls = collections.Counter(r[2] for r in ranges)
    per: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for s, e, name in kernels:
        i = bisect.bisect_right(starts, s) - 1
        while i >= 0 and ranges[i][1] < e:          # not inside this one: an enclosing range, if any
            i -= 1
        if i >= 0 and ranges[i][0] <= s:
            t = per[ranges[i][2]][name[:90]]
            t[0] += e - s
            t[1] += 1
    return {p: [{"kernel": k, "us_per_call": round(t / 1e3 / calls[p], 2), "launches_per_call": round(c / calls[p], 2)}
                for k, (t, c) in sorted(ks.items(), key=lambda kv: -kv[1][0])[:top]]
            for p, ks in sorted(per.items())}


def profile_steps(step, n: int = 2, top: int = 25) -> dict:
    """GPU kernel time per step (torch.profiler), the ``top`` kernels, the timeline's busy time,
    the GPU time of each sparse pass (``TaggedPasses``) and the host time per step.

    Only device-side events count (kernels, memcpy), so nothing is counted twice; the GPU is
    idle for ``step_s - gpu_compute_union_s`` of a step (launch / host bound when large).
    """
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with TaggedPasses(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / n
    passes = {ev.key: {"gpu_s_per_step": round(ev.device_time_total / 1e6 / n, 5), "calls_per_step": ev.count // n}
              for ev in prof.key_averages() if ev.key.startswith("su::")}
    rows = [(ev.key, ev.self_device_time_total / 1e6 / n, ev.count // n)
            for ev in prof.key_averages() if ev.device_type == DeviceType.CUDA and ev.self_device_time_total > 0
            and not ev.key.startswith("su::")]     # a named range's GPU span, not a kernel
    rows.sort(key=lambda r: -r[1])
    # What the host launched: kernels one by one, or whole graphs (their kernels still show above).
    launches = {ev.key: ev.count // n for ev in prof.key_averages() if ev.device_type == DeviceType.CPU
                and any(w in ev.key for w in ("LaunchKernel", "GraphLaunch", "MemcpyAsync", "LaunchKernelEx"))}
    # The host's time in each LoRA op (ours and Unsloth's), sparse pass and graph launch: inclusive
    # CPU time under the profiler, which adds a few microseconds per ATen call inside.
    host_ops = {ev.key: {"host_ms_per_step": round(ev.cpu_time_total / 1e3 / n, 3), "calls_per_step": ev.count // n}
                for ev in prof.key_averages() if ev.device_type == DeviceType.CPU
                and ev.key.startswith(HOST_OP_PREFIXES)}
    total = sum(r[1] for r in rows)
    cats: dict[str, float] = {}
    for key, t, _ in rows:
        cat = next((c for c, words in KERNEL_CATEGORIES if any(w in key.lower() for w in words)), "other")
        cats[cat] = cats.get(cat, 0.0) + t
    return {"gpu_busy_s_per_step": round(total, 5), "wall_s_per_step_profiled": round(wall, 5),
            **guarded(timeline, prof, n), "sparse_passes": dict(sorted(passes.items())),
            "pass_kernels": guarded(pass_kernels, prof, n),
            "kernels_per_step": sum(r[2] for r in rows), "host_launches_per_step": launches,
            "host_ops": dict(sorted(host_ops.items(), key=lambda kv: -kv[1]["host_ms_per_step"])),
            "categories_s_per_step": {c: round(t, 5) for c, t in sorted(cats.items(), key=lambda x: -x[1])},
            "top_kernels": [{"kernel": k[:120], "s_per_step": round(t, 5), "share": round(t / total, 4),
                             "calls_per_step": c} for k, t, c in rows[:top]]}


def host_profile(step, n: int = 2, top: int = 40) -> dict:
    """Where the host spends a step: cProfile over ``n`` steps, the functions and torch ops with
    the most own time (a launch-bound step's time is here, not in the GPU profile).

    cProfile's own overhead inflates Python-heavy functions; read the ranking, not the totals.
    """
    import cProfile
    import pstats

    import torch

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    entry = ("sparse_unsloth/", "runtime_wrappers.py", "eval_frame.py", "cuda/graphs.py", "autograd/function.py",
             "unsloth_zoo/gradient_checkpointing.py")
    rows, ours = [], set()
    for (path, line, name), (_, calls, own, cum, _) in stats.items():
        where = name if path == "~" else f"{'/'.join(path.split('/')[-2:])}:{line}({name})"
        rows.append((own / n, cum / n, calls // n, where))
        if any(e in path for e in entry):          # the full path: shortened, ours loses its package
            ours.add(where)
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    cumulative = sorted((r for r in rows if r[3] in ours), key=lambda r: -r[1])
    return {"host_s_per_step": round(total, 5),
            "top_own_time": [{"where": w, "own_s": round(o, 5), "cum_s": round(c, 5), "calls": k}
                             for o, c, k, w in rows[:top]],
            "top_cumulative_entries": [{"where": w, "own_s": round(o, 5), "cum_s": round(c, 5), "calls": k}
                                       for o, c, k, w in cumulative[:top]]}


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or its error: a failing profiler must not cost the timings measured before."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        log(f"[unsloth] {fn.__name__} failed: {e!r}")
        return {"error": repr(e)}


def dynamo_counters() -> dict:
    """Graph breaks and compiles so far (torch._dynamo's counters), then reset."""
    from torch._dynamo.utils import counters

    out = {"graph_breaks": sum(counters["graph_break"].values()),
           "unique_graphs": counters["stats"].get("unique_graphs", 0),
           "break_reasons": sorted(counters["graph_break"], key=lambda k: -counters["graph_break"][k])[:5]}
    counters.clear()
    return out


def lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# child 1: build + HF PEFT
# ---------------------------------------------------------------------------------------------
def build_model(model_dir: str, layers: int):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Sparse low-rank adaptation of a random model."] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>", pad_token="<pad>")
    hf_tok.model_max_length = 8192
    hf_tok.save_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HID, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=hf_tok.bos_token_id,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
                      rope_parameters={"rope_type": "default", "rope_theta": THETA})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    return model


def child_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    if args.skip_peft and os.path.exists(os.path.join(args.model_dir, "config.json")):
        return {}           # a rerun on a warm machine: the saved model is still there
    model = build_model(args.model_dir, args.layers)
    log("[peft] model built and saved")
    if args.skip_peft:
        return {}
    if args.load_in_4bit:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        del model
        torch.cuda.empty_cache()
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=nf4,
                                                     dtype=torch.bfloat16, device_map={"": 0})
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    ids, labels = make_batch(args)
    opt = torch.optim.AdamW(lora_params(model), lr=1e-4)
    res = time_steps(make_step(model, opt, ids, labels), args.warmup, args.steps, ids.numel())
    log(f"[peft] {res['step_s_median']} s/step")
    return {"hf_peft_lora": res}


# ---------------------------------------------------------------------------------------------
# child 2: Unsloth dense, then sparse
# ---------------------------------------------------------------------------------------------
def random_factors(model, config):
    """Estimator factors of the right shapes with random values (``--estimator random``).

    The estimator's cost depends only on the shapes; an SVD of 98 projections of an 8B model
    would take minutes of device time for numbers that random weights make meaningless anyway.
    """
    import torch

    from sparse_unsloth.estimator import EstimatorFactors
    from sparse_unsloth.estimator.factors import ESTIMATED_PROJS
    from sparse_unsloth.patch.models import decoder_layers, frozen_linear

    layers, r = decoder_layers(model), config.estimator_rank
    gen = torch.Generator(device="cuda").manual_seed(0)
    factors = {}
    for kind, projs in ESTIMATED_PROJS.items():
        for i in config.sparse_layers(kind):
            for p in projs:
                linear = frozen_linear(getattr(getattr(layers[i], kind), p))   # 4-bit weights are packed
                out, inp = linear.out_features, linear.in_features
                factors[f"{i}.{p}"] = (torch.randn(inp, r, device="cuda", generator=gen).bfloat16(),
                                       torch.randn(r, out, device="cuda", generator=gen).bfloat16())
    return EstimatorFactors(factors, r)


def estimator_seconds(model, ids, labels, reps: int = 5) -> float:
    """GPU seconds a step spends on channel choices (CUDA events): every sparse layer's choice for
    this batch, each made in a CUDA graph of its own. In the sparse step each runs inside the
    graph of the pass that first uses it (its prologue), where no event can bracket it; alone,
    each also loads the hidden states (a [tokens, hidden] copy), so this errs high. The estimator
    costs the same for any hidden states: random ones of the step's shape are scored."""
    import torch

    import sparse_unsloth as su
    from sparse_unsloth.patch.state import BatchRecord, token_split

    state = su.sparse_state(model)
    hidden = torch.randn(ids.numel(), HID, device=ids.device, dtype=torch.bfloat16)
    record = BatchRecord(token_split(labels, ids.shape, ids.device, state.config.dense_output_tokens))
    pending = [p for ctl in state.layers.values() for kind in ("mlp", "attn")
               for p in [ctl.choice(kind, hidden, record)[1]] if p is not None]
    run = state.runner(hidden)

    def once() -> None:
        for p in pending:
            p.now(hidden, run)

    for _ in range(3):                  # eager, then captured, then replayed
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        once()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def child_unsloth(args) -> dict:
    import gc

    import torch
    import unsloth  # noqa: F401  (before transformers, so that it patches it)
    from unsloth import FastLanguageModel

    import sparse_unsloth as su
    from sparse_unsloth.config import load_config
    from sparse_unsloth.patch import unsloth_fast

    model, _ = FastLanguageModel.from_pretrained(args.model_dir, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.load_in_4bit, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=ALPHA, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    model.train()
    ids, labels = make_batch(args)
    opt = torch.optim.AdamW(lora_params(model), lr=1e-4)
    step = make_step(model, opt, ids, labels)
    out: dict = {"fast_path_applies": unsloth_fast.applies(model)}
    out["unsloth_dense_lora"] = time_steps(step, args.warmup, args.steps, ids.numel())
    log(f"[unsloth] dense {out['unsloth_dense_lora']['step_s_median']} s/step")
    out["unsloth_dense_lora"]["phases"] = guarded(phase_times, model, opt, ids, labels)
    profiles = {"unsloth_dense_lora": guarded(profile_steps, step)}
    if args.host_profile:
        out["unsloth_dense_lora"]["host_profile"] = guarded(host_profile, step)

    out["dynamo"] = {"unsloth_dense_lora": dynamo_counters()}
    config = load_config(args.preset)
    estimator = random_factors(model, config) if args.estimator == "random" else None
    from sparse_unsloth.patch import state as state_mod

    # Pass by pass first: a variant that fails takes the process, and the ones after it, down.
    variants = [("sparse_passes", True, False, False)] if args.passes_too else []
    variants += [("sparse", True, True, False)] + ([("sparse_eager", False, False, False)] if args.eager_too else [])
    variants += [("sparse_gc_frozen", True, True, True)] if args.gc_frozen_too else []
    for name, graphs, layer_graphs, frozen in variants:
        state_mod.CUDA_GRAPHS = graphs    # read at every call
        state_mod.LAYER_GRAPHS = layer_graphs
        if frozen:            # every object alive now out of the collector's scans (gc.freeze)
            gc.collect()
            gc.freeze()
        su.sparsify(model, config, estimator, progress=False)
        state = su.sparse_state(model)
        state.callback_attached = True   # no trainer here: sparse from the first step, as intended
        res = time_steps(step, args.warmup, args.steps, ids.numel())
        res["stats"] = state.pop_stats()
        res["estimator_s"] = round(estimator_seconds(model, ids, labels), 5)
        out[name] = res
        log(f"[unsloth] {name} {res['step_s_median']} s/step, estimator {res['estimator_s']} s")
        res["phases"] = guarded(phase_times, model, opt, ids, labels)
        profiles[name] = guarded(profile_steps, step)
        res["sync_points"] = guarded(sync_points, step)
        res["host_clock"] = guarded(host_clock, step, state._graphs)
        if args.host_profile:
            res["host_profile"] = guarded(host_profile, step)
        out["dynamo"][name] = dynamo_counters()
        res["graph_captures"] = state._graphs.captures
        res["layer_graph_captures"] = state._layer_graphs.captures
        su.unsparsify(model)
        gc.unfreeze()
    out["profiles"] = profiles
    return out


# ---------------------------------------------------------------------------------------------
# driver: FLOP model, result file, plot
# ---------------------------------------------------------------------------------------------
def model_shape(layers: int):
    """The bench model's sizes, as :func:`sparse_unsloth.flops.flop_count` reads them (no weights)."""
    import types

    return types.SimpleNamespace(hidden_size=HID, intermediate_size=INTER, num_attention_heads=HEADS,
                                 num_key_value_heads=KV_HEADS, num_hidden_layers=layers, vocab_size=VOCAB)


def where_time_goes(result: dict) -> dict:
    """Against the targets: how far off, and the dense vs sparse step split into GPU kernel time
    by category and GPU idle time (host-bound launches), from the profiles."""
    runs, prof = result["runs"], result.get("profiles") or {}
    out = {}
    for name in ("unsloth_dense_lora", "sparse", "sparse_eager", "sparse_passes", "sparse_gc_frozen"):
        p, step = prof.get(name), runs.get(name, {}).get("step_s_median")
        if not p or not step or "error" in p:
            continue
        busy = p.get("gpu_compute_union_s_per_step", p["gpu_busy_s_per_step"])
        out[name] = {"step_s": step, "gpu_kernel_s": p["gpu_busy_s_per_step"], "gpu_compute_busy_s": busy,
                     "gpu_idle_s": round(max(step - busy, 0.0), 5),
                     "gpu_idle_share": round(max(step - busy, 0.0) / step, 4),
                     "sparse_passes": p.get("sparse_passes"),
                     "kernel_launches": p["kernels_per_step"], "host_launches": p.get("host_launches_per_step"),
                     "by_category_s": p["categories_s_per_step"]}
    return out


def against_targets(result: dict) -> dict:
    """Each target with this run's value and whether it is met (``met`` None: not measured)."""
    values = {k: result[k] for k in ("speedup", "speedup_vs_hf_peft", "estimator_share", "memory_vs_dense")}
    values["gpu_idle_share"] = (result["where_time_goes"].get("sparse") or {}).get("gpu_idle_share")
    at_least = ("speedup", "speedup_vs_hf_peft")
    return {k: {"value": v, "target": result["targets"][k],
                "met": None if v is None else (v >= result["targets"][k]) == (k in at_least)}
            for k, v in values.items()}


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_child(stage: str, args, out_dir: str) -> dict:
    path = os.path.join(out_dir, f"bench_{stage}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--child-out", path,
           "--model-dir", args.model_dir, "--layers", str(args.layers), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--preset", args.preset, "--estimator", args.estimator,
           "--batch", str(args.batch), "--seq", str(args.seq), "--output-tokens", str(args.output_tokens)]
    cmd += [flag for flag, on in (("--skip-peft", args.skip_peft),
                                  ("--load-in-4bit", args.load_in_4bit), ("--eager-too", args.eager_too),
                                  ("--passes-too", args.passes_too),
                                  ("--gc-frozen-too", args.gc_frozen_too),
                                  ("--host-profile", args.host_profile)) if on]
    log(f"[driver] {' '.join(cmd)}")
    rc = subprocess.call(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, os.environ.get("PYTHONPATH", "")])})
    if rc != 0 or not os.path.exists(path):
        log(f"[driver] stage {stage} failed (rc {rc})")
        return {"error": f"stage {stage} failed with rc {rc}"}
    with open(path) as f:
        return json.load(f)


def git_commit() -> str:
    """HEAD, or $BENCH_COMMIT where the tree travelled without its history (the device)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[driver] matplotlib missing: no plot")
        return
    order = ["hf_peft_lora", "unsloth_dense_lora", *sorted(k for k in result["runs"] if k.startswith("sparse_")),
             "sparse"]
    names = [n for n in order if "step_s_median" in result["runs"].get(n, {})]
    vals = [result["runs"][n]["step_s_median"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = {"hf_peft_lora": "#999999", "unsloth_dense_lora": "#4c72b0", "sparse": "#dd8452"}
    bars = ax.barh(names, vals, color=[colors.get(n, "#e6b89c") for n in names])
    ax.bar_label(bars, [f"{v:.3f} s" for v in vals])
    ax.set_xlabel("median training step (s), lower is better")
    st = result["settings"]
    ax.set_title(f"Llama-3-8B shape, {st['dtype']} LoRA r=16, {st['batch']}x{st['seq_len']} "
                 f"({st['output_tokens']} output), {st['preset']}, {result['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def target_for(args) -> dict:
    """The speed issue's targets for this case (QLoRA: the QLoRA issue's)."""
    if args.load_in_4bit:
        speedup = 1.4
    elif args.preset != DEFAULT_PRESET:
        speedup = 1.15          # (c): where sparsity saves little, the machinery must cost little
    elif (args.batch, args.seq) != (8, 512):
        speedup = 1.4           # (b)
    else:
        speedup = 1.5           # (a)
    return {"speedup": speedup, "speedup_vs_hf_peft": 2.2, "estimator_share": 0.03, "memory_vs_dense": 1.05,
            "gpu_idle_share": 0.05}


def driver(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.model_dir, exist_ok=True)
    if args.assemble:       # the children ran (on the device); only their files came back
        peft, uns = ({} if args.skip_peft and stage == "peft" else _read(os.path.join(args.out, f"bench_{stage}.json"))
                     for stage in ("peft", "unsloth"))
    else:
        peft = run_child("peft", args, args.out)
        uns = run_child("unsloth", args, args.out)
    runs = {k: v for k, v in {**peft, **uns}.items()
            if k in ("hf_peft_lora", "unsloth_dense_lora") or k.startswith("sparse")}
    from sparse_unsloth.config import load_config  # the driver imports torch only now
    from sparse_unsloth.flops import flop_count

    config = load_config(args.preset)
    shape = model_shape(args.layers)
    dense_f = flop_count(None, shape, args.batch, args.seq, args.output_tokens, RANK)
    sparse_f = flop_count(config, shape, args.batch, args.seq, args.output_tokens, RANK)
    flop_fraction = sparse_f["total"] / dense_f["total"]
    base, sp = runs.get("unsloth_dense_lora", {}), runs.get("sparse", {})
    speedup = base["step_s_median"] / sp["step_s_median"] if "step_s_median" in sp and base else None
    peft_run = runs.get("hf_peft_lora", {})
    result = {
        "name": result_name(args),
        "command": "python scripts/bench_speed.py " + " ".join(a for a in sys.argv[1:] if a != "--assemble"),
        "commit": git_commit(),
        "device": uns.get("device", "unknown"),
        "date": datetime.date.today().isoformat(),
        "settings": {"batch": args.batch, "seq_len": args.seq, "output_tokens": args.output_tokens,
                     "lora_r": RANK, "lora_alpha": ALPHA, "preset": args.preset, "layers": args.layers,
                     "dtype": "nf4" if args.load_in_4bit else "bf16", "warmup_steps": args.warmup,
                     "timed_steps": args.steps, "estimator": args.estimator,
                     "gradient_checkpointing": "unsloth (dense, sparse); non-reentrant (hf_peft_lora)",
                     "block_compile": os.environ.get("UNSLOTH_BLOCK_COMPILE", "1 (default)")},
        "baseline": "unsloth_dense_lora",
        "runs": runs,
        "speedup": round(speedup, 4) if speedup else None,
        "speedup_vs_hf_peft": (round(peft_run["step_s_median"] / sp["step_s_median"], 4)
                               if "step_s_median" in peft_run and "step_s_median" in sp else None),
        "flop_fraction": round(flop_fraction, 4),
        "speedup_over_flop_bound": round(speedup * flop_fraction, 4) if speedup else None,
        "estimator_share": (round(sp["estimator_s"] / sp["step_s_median"], 4)
                            if "estimator_s" in sp else None),
        "memory_vs_dense": (round(sp["peak_mem_gib"] / base["peak_mem_gib"], 4)
                            if "peak_mem_gib" in sp and "peak_mem_gib" in base else None),
        "flops_TFLOP": {"dense": {k: round(v / 1e12, 3) for k, v in dense_f.items()},
                        "sparse": {k: round(v / 1e12, 3) for k, v in sparse_f.items()}},
        "targets": target_for(args),
        "profiles": uns.get("profiles"),
        "dynamo": uns.get("dynamo"),
        "fast_path_applies": uns.get("fast_path_applies"),
        "errors": [r["error"] for r in (peft, uns) if "error" in r] or None,
    }
    result["where_time_goes"] = where_time_goes(result)
    result["against_targets"] = against_targets(result)
    path = os.path.join(args.out, f"{result['name']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, f"{result['name']}.png"))
    log(f"[driver] wrote {path}")
    log(f"{'run':20} {'step s':>8} {'tok/s':>9} {'peak GiB':>9}")
    for name, r in runs.items():
        if "step_s_median" in r:
            log(f"{name:20} {r['step_s_median']:8.4f} {r['tokens_per_s']:9.0f} {r['peak_mem_gib']:9.2f}  "
                f"steps {r['step_times_s']}  host {r.get('host_times_s')}  gc {r.get('gc')}  "
                f"allocator {r.get('allocator')}")
    for key in ("speedup", "speedup_vs_hf_peft", "flop_fraction", "speedup_over_flop_bound", "estimator_share",
                "memory_vs_dense"):
        log(f"{key:24} {result[key]}")
    log("targets: " + ", ".join(f"{k} {'met' if t['met'] else 'MISSED' if t['met'] is False else 'not measured'}"
                                for k, t in result["against_targets"].items()))
    for name, w in result["where_time_goes"].items():
        if "gpu_compute_busy_s" in w:
            log(f"{name:20} GPU compute {w['gpu_compute_busy_s']:.4f} s, idle {w['gpu_idle_share']:.1%}, "
                f"kernels {w['kernel_launches']}")
        ph = result["runs"].get(name, {}).get("phases") or {}
        if "host_fwd_s" in ph:
            log(f"  phases: host fwd {ph['host_fwd_s']:.4f} / GPU {ph['gpu_fwd_s']:.4f} s, host bwd "
                f"{ph['host_bwd_s']:.4f} / GPU {ph['gpu_bwd_s']:.4f} s, GPU tail after bwd {ph['bwd_gpu_tail_s']:.4f} s")
        for op, t in (w.get("sparse_passes") or {}).items():
            log(f"  {op:28} {1e3 * t['gpu_s_per_step']:7.2f} ms  {t['calls_per_step']:4d} calls")
        for op, t in list(((result.get("profiles") or {}).get(name, {}).get("host_ops") or {}).items())[:14]:
            log(f"  profiled host {op[:40]:40} {t['host_ms_per_step']:8.2f} ms  {t['calls_per_step']:5d} calls")
        clock = result["runs"].get(name, {}).get("host_clock") or {}
        if "by_op_and_pass" in clock:
            log(f"  host clock: {clock['host_s_per_step']:.4f} s to the step's last launch")
            for op, t in clock["by_op_and_pass"].items():
                log(f"  clock {op:34} {t['ms_per_step']:8.2f} ms {t['calls_per_step']:5d} calls {t['us_per_call']:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--model-dir", default="/tmp/bench_llama3_8b_shape")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128, help="labelled tokens at the end of each row")
    ap.add_argument("--load-in-4bit", action="store_true", help="NF4 QLoRA in all three runs")
    ap.add_argument("--estimator", choices=["random", "svd"], default="random",
                    help="random-valued factors of the right shapes (same cost), or the SVD build")
    ap.add_argument("--skip-peft", action="store_true", help="build the model but do not time HF PEFT")
    ap.add_argument("--host-profile", action="store_true",
                    help="also profile the host side of a dense and a sparse step (cProfile)")
    ap.add_argument("--passes-too", action="store_true",
                    help="also time the sparse step without layer graphs, each layer's passes replayed one "
                         "by one (SPARSE_UNSLOTH_LAYER_GRAPHS=0)")
    ap.add_argument("--eager-too", action="store_true",
                    help="also time the sparse step without CUDA graphs (SPARSE_UNSLOTH_CUDA_GRAPHS=0)")
    ap.add_argument("--gc-frozen-too", action="store_true",
                    help="also time the sparse step with every object alive before it frozen out of the "
                         "garbage collector's scans (gc.freeze): are its pauses what varies the step?")
    ap.add_argument("--assemble", action="store_true",
                    help="write the result file from the bench_{peft,unsloth}.json already in --out "
                         "(what a device call brought back) instead of running the children")
    ap.add_argument("--stage", choices=["driver", "peft", "unsloth"], default="driver")
    ap.add_argument("--child-out", default=None)
    args = ap.parse_args()
    if args.stage == "driver":
        driver(args)
        return
    import torch

    res = child_peft(args) if args.stage == "peft" else child_unsloth(args)
    res["device"] = torch.cuda.get_device_name(0)
    with open(args.child_out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
