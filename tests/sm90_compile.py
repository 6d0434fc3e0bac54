"""Compile the Triton kernels for sm_90 (Hopper) without a GPU; print what the compiler made of them.

Run as a script in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit``
at import). Arguments are specialized as Triton's launcher would for the Llama-3-8B products:
16-byte aligned pointers, sizes and strides divisible by 16, unit strides as constants. Prints
one JSON object: per kernel variant, the async-copy count (software-pipelined loads), the
warpgroup MMA count and the shared memory used.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_unsloth.ops import ffn_score, gather_mm


def _compile(fn, pointers: dict, consts: dict, opts: dict, not_div: tuple = ()) -> dict:
    sig = {n: pointers.get(n, "i32") for n in fn.arg_names}
    sig.update({n: "constexpr" for n in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if n not in consts and n not in not_div}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    ttgir = kernel.asm["ttgir"]
    return {"async_copies": ttgir.count("async_copy_global_to_local"),
            "wgmma": ttgir.count("ttng.warp_group_dot "), "shared": kernel.metadata.shared}


def main() -> None:
    gm = {"x_ptr": "*bf16", "m_ptr": "*bf16", "out_ptr": "*bf16", "kept_ptr": "*i64", "dense_ptr": "*i64",
          "mask_ptr": "*i1"}
    tiles = {"UPCAST": False, "IEEE": False, "BM": 128, "BN": 128, "BK": 64}
    opts = {"num_warps": 8, "num_stages": 3}
    out = {
        # gate/up forward: m = W.T (unit stride along K), accumulating into the LoRA output
        "keep_cols_fwd": _compile(gather_mm._gather_mm_kernel.fn, gm,
                                  {"MODE": 0, "ACCUMULATE": True, **tiles, "sxk": 1, "smk": 1, "soc": 1},
                                  opts, ("KEPT", "D")),
        # gate/up input gradient: m = W (unit stride along the output columns)
        "keep_rows_dx": _compile(gather_mm._gather_mm_kernel.fn, gm,
                                 {"MODE": 1, "ACCUMULATE": False, **tiles, "sxk": 1, "smn": 1, "soc": 1},
                                 opts, ("KEPT", "D")),
        "ffn_score": _compile(ffn_score._ffn_score_kernel.fn,
                              {"tg_ptr": "*bf16", "tu_ptr": "*bf16", "g2_ptr": "*bf16", "u2_ptr": "*bf16",
                               "out_ptr": "*fp32"},
                              {"UPCAST": False, "IEEE": False, "BR": 16, "BM": 64, "BN": 128,
                               "s_tgk": 1, "s_tuk": 1, "s_g2n": 1, "s_u2n": 1},
                              {"num_warps": 4, "num_stages": 3}, ("R", "RANK")),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
