"""y = x @ w.T for a few rows of x (decode at batch 1): a matrix-vector product that streams the
weights once.

At batch 1 on the H200, cuBLAS's kernels read Qwen3-0.6B's layer weights at about a quarter of the
bandwidth (gate_up: 12.4 us for 12.6 MB), and those GEMMs are most of a decode step. Here each
program owns BLOCK_N output features: it reads their rows of w once, in BLOCK_K chunks, and
multiplies them with every row of x on the CUDA cores, accumulating in fp32. BLOCK_N is chosen so
that a GEMM has enough programs to keep every SM streaming (small N gets narrow blocks). Inside the
decode graphs it takes 6.3 us a GEMM on average where cuBLAS took 7.3 (its split-K reduction
included): about 1.2 TB/s, so there is room left (wider loads, tuned blocks).
"""

import torch
import triton
import triton.language as tl

MAX_ROWS = 4          # rows of x this kernel takes
BLOCK_K = 512
# where it is used (linear layers): one row and weights up to this size. That is what was measured
# faster than cuBLAS inside the decode graphs (Qwen3-0.6B at batch 1, docs/benchmarks.md); cuBLAS
# reads 8B-sized weights at the bandwidth already, and more rows cost this kernel registers.
USE_ROWS = 1
USE_MAX_WEIGHT_BYTES = 16 << 20
TARGET_PROGRAMS = 256


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program n: y[:, n * BLOCK_N : +BLOCK_N] for all M rows of x (M <= BLOCK_M)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def block_n(n: int) -> int:
    """Output features per program: the widest power of two in [4, 32] that still gives about
    TARGET_PROGRAMS programs."""
    width = 4
    while width < 32 and n // (width * 2) >= TARGET_PROGRAMS:
        width *= 2
    return width


def worth_it(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.shape[0] <= USE_ROWS and w.numel() * w.element_size() <= USE_MAX_WEIGHT_BYTES


def skinny_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, rows contiguous), w [N, K] contiguous -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= MAX_ROWS and w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    width = block_n(n)
    _skinny_kernel[(triton.cdiv(n, width),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                             BLOCK_M=triton.next_power_of_2(max(m, 1)), BLOCK_N=width,
                                             BLOCK_K=BLOCK_K)
    return y
