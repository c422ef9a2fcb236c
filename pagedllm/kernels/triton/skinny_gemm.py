"""y = x @ w.T for one row of x (decode at batch 1): a matrix-vector product that streams the weights
once, optionally applying SiLU-and-mul to x as it loads it (the MLP's down projection).

At batch 1 a decode step is little but reading every weight once, in GEMMs far too thin for cuBLAS's
tiles. Here each program owns BLOCK_N output features and reads their rows of w in BLOCK_K chunks.
The blocks come from a sweep on the H200 inside CUDA graphs (benchmarks/skinny_gemm_sweep.py,
docs/benchmarks.md): one warp a program and many programs, so every SM holds many independent loads
in flight; that beat cuBLAS on Qwen3-0.6B's and Qwen3-8B's layers (0.6B: 19 us a layer against 32 for
cuBLAS; 8B: 110 against 113).
"""

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs

BLOCK_K = 1024


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr):
    """Program n: y[n * BLOCK_N : +BLOCK_N]. GATED: x holds [gate | up] (2K values) and the row
    multiplied is silu(gate) * up, rounded to x's dtype as the unfused op would store it. The
    first chunk of weights is loaded before waiting for x (pdl.py), each next one before the
    current one is used."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    row_ok = cols[:, None] < N
    offs = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + offs[None, :], mask=row_ok & (offs < K)[None, :], other=0.0)
    wait_for_inputs(PDL)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs
        in_k = ks < K
        w_next = tl.load(w_rows + BLOCK_K + ks[None, :], mask=row_ok & (ks + BLOCK_K < K)[None, :], other=0.0)
        x = tl.load(x_ptr + ks, mask=in_k, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + K + ks, mask=in_k, other=0.0).to(tl.float32)
            x = (x * tl.sigmoid(x) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        w = w_next
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


def block_n(k: int) -> int:
    """Output features per program: 4 rows of 1,024 or 2 longer ones (the sweep's best, near enough)."""
    return 4 if k <= 1024 else 2


def skinny_linear(x: torch.Tensor, w: torch.Tensor, gated: bool = False, overlap: bool = True) -> torch.Tensor:
    """x [1, K] (or [1, 2K] of gate|up when gated), w [N, K], both contiguous -> [1, N] in x's dtype.
    overlap: launch with PDL (pdl.py), to start while the kernel before it runs."""
    n, k = w.shape
    assert x.shape == (1, 2 * k if gated else k) and x.is_contiguous() and w.is_contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    width = block_n(k)
    _skinny_kernel[(triton.cdiv(n, width),)](x, w, y, n, k, w.stride(0), BLOCK_N=width, BLOCK_K=BLOCK_K,
                                             GATED=gated, num_warps=1, num_stages=1,
                                             **pdl.launch_options(x.device, wanted=overlap))
    return y
