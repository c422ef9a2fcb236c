"""Registers, spills and resident programs per SM of the skinny GEMM, compiled for Hopper (sm90) on any
machine: Triton compiles offline and the CUDA tools it ships report what ptxas allocated.

Why it matters: the kernel runs one-warp programs and streams weights, so its speed is how many loads
an SM keeps in flight. Hopper holds at most 32 programs (thread blocks) an SM, and 64K registers:
up to 64 registers a thread, 32 programs fit; at 84, 23; at 124, 16 (docs/benchmarks.md).

A development tool: `python benchmarks/skinny_registers.py [--kernel-file PATH]` (PATH: another
version of kernels/triton/skinny_gemm.py to compare, e.g. one from `git show`).
"""

import argparse
import importlib.util
import math
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedllm.kernels.triton import skinny_gemm

SHAPES = {"0.6B qkv": (4096, 1024), "0.6B o": (1024, 2048), "0.6B gate_up": (6144, 1024),
          "0.6B down": (1024, 3072), "8B qkv": (6144, 4096), "8B o": (4096, 4096),
          "8B gate_up": (24576, 4096), "8B down": (4096, 12288)}
HOPPER = GPUTarget("cuda", 90, 32)
MAX_PROGRAMS_PER_SM = 32
REGISTERS_PER_SM = 65536


def compile_usage(kernel, block_n: int, gated: bool) -> tuple[int, int]:
    """(registers a thread, stack bytes a thread) of one compiled variant, arguments assumed 16-aligned
    as Triton specialises them at run time."""
    constants = {"BLOCK_N": block_n, "BLOCK_K": skinny_gemm.BLOCK_K, "GATED": gated}
    if "PDL" in kernel.arg_names:
        constants["PDL"] = True
    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32", "stride_w": "i32",
                 **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(6)})
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": 1, "num_stages": 1})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def programs_per_sm(registers: int) -> int:
    """Resident one-warp programs: registers are allocated 8 a thread at a time, 256 a warp."""
    per_warp = math.ceil(registers / 8) * 8 * 32
    return min(MAX_PROGRAMS_PER_SM, REGISTERS_PER_SM // per_warp)


def load_kernel(path: str | None):
    if path is None:
        return skinny_gemm._skinny_kernel
    spec = importlib.util.spec_from_file_location("skinny_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._skinny_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-file", help="another version of kernels/triton/skinny_gemm.py")
    args = parser.parse_args()
    kernel = load_kernel(args.kernel_file)
    print(f"{'layer':14s} {'N':>6s} {'K':>6s} BLOCK_N gated registers stack programs/SM")
    for name, (n, k) in SHAPES.items():
        gated = name.endswith("down")
        block_n = skinny_gemm.block_n(k)
        registers, stack = compile_usage(kernel, block_n, gated)
        print(f"{name:14s} {n:6d} {k:6d} {block_n:7d} {gated!s:5s} {registers:9d} {stack:5d} "
              f"{programs_per_sm(registers):11d}")


if __name__ == "__main__":
    main()
