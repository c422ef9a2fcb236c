"""The skinny GEMM (decode at batch 1-4) against cuBLAS (F.linear) on the layer shapes of Qwen3-0.6B
and Qwen3-8B: microseconds per call and the weights' read rate. A development tool for a GPU:
`python benchmarks/skinny_gemm_bench.py`."""

import torch
import torch.nn.functional as F

from pagedllm.kernels.triton.skinny_gemm import skinny_linear

SHAPES = {"0.6B qkv": (4096, 1024), "0.6B o": (1024, 2048), "0.6B gate_up": (6144, 1024),
          "0.6B down": (1024, 3072), "8B qkv": (6144, 4096), "8B o": (4096, 4096),
          "8B gate_up": (24576, 4096), "8B down": (4096, 12288)}


def time_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    print(f"{'shape':14} {'M':>2} {'cuBLAS us':>10} {'skinny us':>10} {'cuBLAS TB/s':>12} {'skinny TB/s':>12} max|diff|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref, ours = time_us(lambda: F.linear(x, w)), time_us(lambda: skinny_linear(x, w))
            diff = (F.linear(x, w).float() - skinny_linear(x, w).float()).abs().max().item()
            nbytes = w.numel() * 2
            print(f"{name:14} {m:2} {ref:10.2f} {ours:10.2f} {nbytes / ref / 1e6:12.2f} {nbytes / ours / 1e6:12.2f} {diff:.4f}")


if __name__ == "__main__":
    main()
