"""Compiles kernels/moe.py's three kernels for sm_90 (H100/H200) down to
cubin on a machine without a GPU (Triton's ahead-of-time path), in the
dtypes and row tiles the launcher uses on CUDA: catches what the interpreter
cannot (lowering, layouts, shared memory). Compiling is not running: the
``moe`` part of benchmarks/gpu_check.sh checks the results on a GPU.

    TRITON_INTERPRET= python tools/compile_moe.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import moe  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # an sm_90 block's shared memory (dynamic, opted in)
DOT_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
GATE_UP_ARGS = ["x_ptr", "w_ptr", "act_ptr", "pair_ptr", "block_expert_ptr", "num_pairs", "hidden", "inter",
                "num_experts", "stride_x", "stride_we", "stride_wn", "stride_act"]
DOWN_ARGS = ["act_ptr", "w_ptr", "weight_ptr", "y_ptr", "pair_ptr", "block_expert_ptr", "num_pairs", "hidden",
             "inter", "num_experts", "stride_act", "stride_we", "stride_wn", "stride_y"]
COMBINE_ARGS = ["y_ptr", "out_ptr", "num_tokens", "hidden", "stride_y", "stride_out"]


def compile_one(kernel, names: list[str], types: list[str], constants: dict, **options) -> int:
    """Compiles one variant; returns its shared memory bytes (checked to fit)."""
    signature = dict(zip(names, types)) | {name: "constexpr" for name in constants}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=TARGET, options=options)
    shared = compiled.metadata.shared
    if shared > MAX_SHARED:
        raise SystemExit(f"{kernel.__name__} {constants}: {shared} bytes of shared memory, over {MAX_SHARED}")
    return shared


def main() -> None:
    t0 = time.time()
    shared = 0
    for dt, dot in DOT_DTYPES.items():
        precision = "ieee" if dt == "fp32" else "tf32"
        for block_m in (16, 32, 64):
            tiles = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, DOT_DTYPE=dot, PRECISION=precision)
            shared = max(shared, compile_one(moe._gate_up_kernel, GATE_UP_ARGS, [f"*{dt}"] * 3 + ["*i32"] * 2 + ["i32"] * 8,
                        dict(TOP_K=8, **tiles), num_warps=4, num_stages=3))
            shared = max(shared, compile_one(moe._down_kernel, DOWN_ARGS, [f"*{dt}", f"*{dt}", "*fp32", "*fp32", "*i32", "*i32"] + ["i32"] * 8,
                        tiles, num_warps=4, num_stages=3))
        compile_one(moe._combine_kernel, COMBINE_ARGS, ["*fp32", f"*{dt}"] + ["i32"] * 4,
                    dict(TOP_K=8, BLOCK_T=4, BLOCK_H=1024), num_warps=4)
        print(f"{dt}: gate_up and down at BLOCK_M 16/32/64, combine: compiled for sm_90 "
              f"({time.time() - t0:.1f} s so far; most shared memory {shared // 1024} KiB)", flush=True)


if __name__ == "__main__":
    main()
