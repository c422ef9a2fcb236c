"""y = x @ w.T for the few rows of a decode step (up to MAX_ROWS), optionally followed by the MLP's
SiLU-and-mul in the epilogue (w = [gate | up]: y = silu(x @ gate.T) * (x @ up.T)), so that the
activation kernel goes away.

A small model's decode GEMMs read a few MB of weights each: cuBLAS takes 5-6 us for what the
bandwidth would stream in 1-3 us, most of it ramp-up and tail. Ours loads its first weight tile
before waiting for the previous kernel (programmatic dependent launch, pdl.py), so that ramp-up
overlaps the kernel before it. Each program owns BLOCK_M rows x BLOCK_N output features and walks
K in BLOCK_K tiles through the tensor cores; config() comes from benchmarks/small_gemm_sweep.py on
the H200 (docs/benchmarks.md). The activation goes in the epilogue, not into the down projection's
input loads as in the skinny kernel: computed there, it made the down projection 3x slower than
cuBLAS in the sweep (its K loop apparently no longer pipelined).
"""

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs

MAX_ROWS = 64
SHARED_MEMORY = 200 * 1024   # bytes of K tiles a program may take (227 KB an SM on Hopper)


@triton.jit
def _small_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SILU_AND_MUL: tl.constexpr, PDL: tl.constexpr):
    """Program (n, m): y[m * BLOCK_M : +BLOCK_M, n * BLOCK_N : +BLOCK_N]. The first K tile is
    peeled so that its weights load before the wait for x; the loop after it is pipelined.
    SILU_AND_MUL: w has 2N rows, gate then up; each product is rounded to y's dtype before the
    activation, as the unfused ops store them."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    up_ptrs = w_ptrs + N * stride_w
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    col_ok = cols[:, None] < N
    row_ok = rows[:, None] < M
    in_k = (ks < K)[None, :]
    w = tl.load(w_ptrs, mask=col_ok & in_k, other=0.0)
    if SILU_AND_MUL:
        up_w = tl.load(up_ptrs, mask=col_ok & in_k, other=0.0)
    wait_for_inputs(PDL)
    x = tl.load(x_ptrs, mask=row_ok & in_k, other=0.0)
    acc = tl.dot(x, tl.trans(w))
    if SILU_AND_MUL:
        acc_up = tl.dot(x, tl.trans(up_w))
    for k0 in range(BLOCK_K, K, BLOCK_K):
        in_k = (k0 + ks < K)[None, :]
        x = tl.load(x_ptrs + k0, mask=row_ok & in_k, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k0, mask=col_ok & in_k, other=0.0)), acc)
        if SILU_AND_MUL:
            acc_up = tl.dot(x, tl.trans(tl.load(up_ptrs + k0, mask=col_ok & in_k, other=0.0)), acc_up)
    if SILU_AND_MUL:
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok & (cols < N)[None, :])


def config(m: int, n: int, k: int, silu_and_mul: bool = False) -> dict:
    """Blocks and launch shape for [m, k] x [k, n] (n outputs, from 2n weight rows with silu_and_mul),
    from the sweep: rows no taller than the batch; about 100 or more programs' worth of weight rows;
    longer K tiles where K is the long side; as many stages as shared memory holds, except 3 for
    the gate/up epilogue's wide tiles (5% to 14% faster than 4 on Qwen3-8B at 1 to 16 rows)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    rows = 2 * n if silu_and_mul else n
    widths = (128, 64, 32) if block_m == 16 else (64, 32)
    block_n = next((b for b in widths if rows // b >= 96), 16)
    block_n = max(16, block_n // 2) if silu_and_mul else block_n
    block_k = 256 if k >= n and block_m <= 32 else 128
    stages = min(5, SHARED_MEMORY // stage_bytes(block_m, block_n, block_k, silu_and_mul) - 1)
    if silu_and_mul and block_n >= 64:
        stages = 3
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=max(2, stages))


def stage_bytes(block_m: int, block_n: int, block_k: int, silu_and_mul: bool) -> int:
    """Shared memory for one K tile of x and w in half precision. Triton keeps num_stages + 1 of them."""
    return (block_m + block_n * (2 if silu_and_mul else 1)) * block_k * 2


def small_linear(x: torch.Tensor, w: torch.Tensor, silu_and_mul: bool = False, overlap: bool = True,
                 **override) -> torch.Tensor:
    """x [M, K], w [N, K] (or [2N, K] of gate|up rows with silu_and_mul), both with unit stride
    along K -> [M, N] in x's dtype. overlap: launch with PDL (pdl.py), to start while the kernel
    before it runs. override: config() keys (for the sweep)."""
    n, k = w.shape
    n = n // 2 if silu_and_mul else n
    m = x.shape[0]
    assert x.shape == (m, k) and x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = config(m, n, k, silu_and_mul) | override
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _small_gemm_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                             SILU_AND_MUL=silu_and_mul, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                             **pdl.launch_options(x.device, wanted=overlap))
    return y
