"""The Triton kernels the fast path launches also compile for the GPU (sm_90), checked without one.

The interpreter (tests/conftest.py) checks their math but not that Triton's compiler accepts
them: a construct it rejects would first show on the device. So each kernel variant the fast
path launches is compiled for Hopper here, in a process without the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_unsloth.ops import keep_context, lora_swiglu, topk

def build(fn, pointers, consts, num_warps):
    sig = {n: pointers.get(n, "i32") for n in fn.arg_names}
    sig.update({n: "constexpr" for n in consts})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})
    return True

done = {}
for dt in ("bf16", "fp16", "fp32", "fp64"):
    for add in (False, True):
        done[f"keep_context {dt} add={add}"] = build(
            keep_context._keep_context_kernel,
            {"src_ptr": "*" + dt, "out_ptr": "*" + dt, "dense_ptr": "*u8", "kept_ptr": "*u8"},
            {"ADD": add, "UPCAST": dt in ("bf16", "fp16"), "BLOCK_N": 32, "BLOCK_C": 128}, 4)
for dt in ("bf16", "fp32"):
    done[f"topk_sorted {dt}"] = build(topk._topk_sorted_kernel, {"x_ptr": "*" + dt, "out_ptr": "*i64"},
                                      {"BLOCK": 16384}, 16)
ins = {n: "*bf16" for n in ("tg", "tu", "td", "gb", "ub", "dat")}
tiles = {"UPCAST": False, "IEEE": False, "BR": 16, "BM": 32, "BC": 64, "SPLIT": 4}
for backward in (False, True):
    done[f"lora_swiglu rows backward={backward}"] = build(
        lora_swiglu._rows_kernel.fn, {**ins, "q_out": "*fp32", "rg_out": "*fp32", "ru_out": "*fp32"},
        {"BACKWARD": backward, **tiles}, 4)
done["lora_swiglu cols"] = build(lora_swiglu._cols_kernel.fn,
                                 {**ins, "dgb_out": "*fp32", "dub_out": "*fp32", "ddat_out": "*fp32"}, tiles, 4)
json.dump(done, sys.stdout)
'''


def test_fast_path_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _SCRIPT], check=False, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads(res.stdout)
    assert len(done) == 13 and all(done.values()), done
