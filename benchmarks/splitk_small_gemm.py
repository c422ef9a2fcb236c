"""An experiment that lost: the small-batch GEMM with split-K and an in-kernel reduction (the last split
of a column tile sums the fp32 partials and resets the tile's counter, so CUDA-graph replays work),
timed in graphs against cuBLAS and small_gemm's config() on Qwen3-8B's one-row GEMMs and Qwen3-0.6B's
at 1, 128 and 256 rows. The idea: 8B's qkv at one row runs 96 programs on 132 SMs at 3.2 TB/s while
gate_up's 768 programs reach 4.0. On the H200 no split beat config() at one row (qkv 15.68 us either
way) and every split lost to cuBLAS at 128-256 rows (results/h200/splitk-small-gemm-ec24eb5.txt).
    python benchmarks/splitk_small_gemm.py                       (GPU: the timings)
    PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/splitk_small_gemm.py   (CPU: correctness only)
"""
import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_x, stride_w, stride_y, K_SPLIT,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                   PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    tile = pid_m * tl.num_programs(0) + pid_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_begin = split * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    col_ok = cols[:, None] < N
    row_ok = rows[:, None] < M
    in_k = (k_begin + ks < k_end)[None, :]
    w = tl.load(w_ptrs + k_begin, mask=col_ok & in_k, other=0.0)
    wait_for_inputs(PDL)
    x = tl.load(x_ptrs + k_begin, mask=row_ok & in_k, other=0.0)
    acc = tl.dot(x, tl.trans(w))
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        in_k = (k0 + ks < k_end)[None, :]
        x = tl.load(x_ptrs + k0, mask=row_ok & in_k, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k0, mask=col_ok & in_k, other=0.0)), acc)
    out_ok = row_ok & (cols < N)[None, :]
    part = part_ptr + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(part, acc, mask=out_ok)
    done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    if done == SPLITS - 1:
        total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for s in range(SPLITS):
            total += tl.load(part_ptr + s * M * N + rows[:, None] * N + cols[None, :], mask=out_ok, other=0.0,
                             cache_modifier=".cg")
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], total.to(y_ptr.dtype.element_ty),
                 mask=out_ok)
        tl.store(count_ptr + tile, 0)


_SCRATCH = {}


def splitk_linear(x, w, splits=4, block_n=64, block_k=128, stages=4, warps=4, block_m=16):
    m, k = x.shape
    n = w.shape[0]
    key = (x.device, m, n, splits, block_n, block_m)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(splits * m * n, dtype=torch.float32, device=x.device),
                         torch.zeros(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), dtype=torch.int32,
                                     device=x.device))
    part, count = _SCRATCH[key]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, k_split), triton.cdiv(m, block_m))
    _splitk_kernel[grid](x, w, y, part, count, m, n, k, x.stride(0), w.stride(0), y.stride(0), k_split,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=grid[1], num_warps=warps,
                         num_stages=stages, **pdl.launch_options(x.device))
    return y


def main():
    if not torch.cuda.is_available():
        from tests.triton_interpreter import patch_interpreter
        patch_interpreter()
        for m, n, k, s, bm in [(1, 40, 300, 3, 16), (3, 64, 256, 2, 16), (1, 100, 128, 1, 16), (40, 48, 256, 2, 16)]:
            x, w = torch.randn(m, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
            for _ in range(2):   # twice: the counters must be back at 0
                got = splitk_linear(x, w, splits=s, block_n=32, block_k=64, block_m=bm).float()
                err = (got - x.float() @ w.float().T).abs().max().item()
                print(m, n, k, s, "max err", err)
                assert err < 0.05 * k ** 0.5
        return
    from skinny_gemm_sweep import STREAMED_BYTES, graph_us
    from pagedllm.kernels.triton import small_gemm
    F = torch.nn.functional
    cases = [("8B qkv", 1, 6144, 4096), ("8B o", 1, 4096, 4096), ("8B down", 1, 4096, 12288),
             ("0.6B qkv", 1, 4096, 1024)]
    cases += [(f"0.6B {name}", m, n, k) for m in (128, 256)
              for name, n, k in (("qkv", 4096, 1024), ("o", 1024, 2048), ("down", 1024, 3072))]
    for name, m, n, k in cases:
        copies = max(4, STREAMED_BYTES // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0]).float()
        cublas = graph_us([lambda w=w: F.linear(x, w) for w in ws])
        line = f"{name} M={m}: cuBLAS {cublas:.2f} us"
        if m <= small_gemm.MAX_ROWS:
            line += f", small_gemm config() {graph_us([lambda w=w: small_gemm.small_linear(x, w) for w in ws]):.2f} us"
        print(line, flush=True)
        if m == 1:
            grid = [(sp, bn, 128, st, 16) for sp in (2, 3, 4, 6) for bn in (32, 64) for st in (3, 4)]
        else:
            grid = [(sp, bn, 64, 3, bm) for sp in (2, 4) for bn in (64, 128) for bm in (64, 128)]
        for splits, bn, bk, stages, bm in grid:
            try:
                got = splitk_linear(x, ws[0], splits, bn, bk, stages, 4 if bm < 128 else 8, bm).float()
                assert (got - ref).abs().max().item() < 0.05, (got - ref).abs().max().item()
                us = graph_us([lambda w=w: splitk_linear(x, w, splits, bn, bk, stages, 4 if bm < 128 else 8, bm)
                               for w in ws])
            except Exception as e:
                print(f"  splits {splits} m{bm} n{bn} k{bk} s{stages}: {type(e).__name__} {str(e)[:80]}")
                continue
            print(f"  splits {splits} m{bm} n{bn} k{bk} s{stages}: {us:.2f} us ({n * k * 2 / us / 1e6:.2f} TB/s)",
                  flush=True)


if __name__ == "__main__":
    main()
