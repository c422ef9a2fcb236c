"""An experiment for the decode GEMMs of 65-256 rows, where cuBLAS runs today: a Triton GEMM whose tiles
come through Hopper's tensor memory accelerator (host-side TensorDescriptors; the compiler pipelines
them into wgmma), launched with programmatic dependent launch and, in the "peeled" variant, its first
weight tile loaded before the wait for the previous kernel. small_gemm.py's pointer loads only tie
cuBLAS at 128-256 rows at their best tiles (results/h200/small-gemm-sweep-large-e406889.txt), so folding
RMSNorm or SiLU into our GEMM cannot pay there; this asks whether TMA tiles are faster alone.

Timed as small_gemm_sweep.py times: launches back to back in one CUDA graph, each on its own copy of the
weights (so L2 never holds them), ours chained with PDL, against cuBLAS. Prints, per shape and rows,
cuBLAS, small_gemm's config() and the best TMA tiles, and checks every result against F.linear.
    python benchmarks/tma_gemm_sweep.py [--quick]               (GPU: the timings)
    PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/tma_gemm_sweep.py --check   (CPU: correctness only)
"""
import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pagedllm.kernels.triton import pdl, small_gemm
from pagedllm.kernels.triton.pdl import wait_for_inputs
from skinny_gemm_sweep import SHAPES, STREAMED_BYTES, graph_us

ROWS = (64, 96, 128, 192, 256)


@triton.jit
def _tma_gemm_kernel(x_desc, w_desc, y_ptr, M, N, K, stride_y,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PEEL: tl.constexpr, PDL: tl.constexpr):
    """Program (n, m): y[m * BLOCK_M : +BLOCK_M, n * BLOCK_N : +BLOCK_N] = x @ w.T. PEEL: the first K
    tile of w loads before the wait for x (weights are nothing another kernel writes)."""
    off_n = tl.program_id(0) * BLOCK_N
    off_m = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k0 = 0
    if PEEL:
        w = w_desc.load([off_n, 0])
        wait_for_inputs(PDL)
        acc = tl.dot(x_desc.load([off_m, 0]), w.T, acc)
        k0 = BLOCK_K
    else:
        wait_for_inputs(PDL)
    for k in range(k0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def tma_linear(x: torch.Tensor, w: torch.Tensor, cfg: dict, overlap: bool = True) -> torch.Tensor:
    """x [M, K] @ w [N, K].T with cfg's BLOCK_M/N/K, num_warps, num_stages and PEEL."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    w_desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _tma_gemm_kernel[grid](x_desc, w_desc, y, m, n, k, y.stride(0), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                           BLOCK_K=cfg["BLOCK_K"], PEEL=cfg["PEEL"], num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"], **pdl.launch_options(x.device, wanted=overlap))
    return y


def candidates(m: int, n: int, quick: bool) -> list[dict]:
    """Tiles of 64 or 128 rows (one or two warpgroups), 64-256 columns, 64-wide K tiles, 3-5 stages."""
    grid = ((64,), (64, 128), (64,), (4,), (True,)) if quick else \
        ((64, 128), (64, 128, 256), (64, 128), (3, 4, 5), (False, True))
    out = []
    for bm, bn, bk, stages, peel in itertools.product(*grid):
        smem = (bm + bn) * bk * 2 * stages
        if bm <= max(64, triton.next_power_of_2(m)) and bn <= n and smem <= 220 * 1024:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, PEEL=peel,
                            num_warps=8 if bm == 128 else 4))
    return out


def key(cfg: dict) -> str:
    return (f"m{cfg['BLOCK_M']} n{cfg['BLOCK_N']} k{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            f"{' peel' if cfg['PEEL'] else ''}")


def sweep(name: str, n: int, k: int, m: int, quick: bool) -> None:
    copies = max(4, STREAMED_BYTES // (n * k * 2))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    cublas = graph_us([lambda w=w: F.linear(x, w) for w in weights])
    default = small_gemm.config(m, n, k)
    small = graph_us([lambda w=w: small_gemm.small_linear(x, w, **default) for w in weights])
    timed = {}
    for cfg in candidates(m, n, quick):
        try:
            got = tma_linear(x, weights[0], cfg).float()
        except triton.runtime.errors.OutOfResources:
            continue
        assert (got - ref).abs().max().item() < 0.125, (name, m, cfg)
        timed[key(cfg)] = graph_us([lambda w=w, cfg=cfg: tma_linear(x, w, cfg) for w in weights])
    best = min(timed.items(), key=lambda kv: kv[1])
    print(f"{name:12} M={m:3}  cuBLAS {cublas:6.2f}  small_gemm config() {small:6.2f}  TMA best {best[1]:6.2f}"
          f" ({best[0]}, {n * k * 2 / 1e6 / best[1]:.2f} TB/s)", flush=True)


def check() -> None:
    """Correctness of both variants on small shapes (the CPU interpreter, in float16: its tl.dot
    multiplies bfloat16's raw bits, see tests/triton_interpreter.py; or a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(0)
    for m, n, k, peel in [(70, 96, 192, False), (70, 96, 192, True), (64, 64, 64, True)]:
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        w = torch.randn(n, k, generator=gen).to(dtype).to(device)
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=3, num_warps=4, PEEL=peel)
        got = tma_linear(x, w, cfg).float()
        ref = F.linear(x.float(), w.float())
        assert (got - ref).abs().max().item() < 0.25 + 0.01 * ref.abs().max().item(), (m, n, k, peel)
    print("tma_linear matches F.linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few tiles (a smoke test)")
    parser.add_argument("--check", action="store_true", help="correctness only, on small shapes")
    parser.add_argument("--only", default="", help="shapes whose name starts with this (e.g. 0.6B)")
    args = parser.parse_args()
    check()
    if args.check:
        return
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
    for name, (n, k) in SHAPES.items():
        for m in ROWS if name.startswith(args.only) else ():
            sweep(name, n, k, m, args.quick)


if __name__ == "__main__":
    main()
