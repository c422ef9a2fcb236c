"""Which blocks and warps make the skinny GEMM stream weights fastest, timed the way the decode graphs
run it: many launches back to back inside one CUDA graph, each on another copy of the weights so
that L2 (50 MB) never holds them. Also times cuBLAS the same way, and cuBLAS at batch 128 and 256 on
Qwen3-8B's shapes (the GEMM efficiency that a big model's decode steps get).

A development tool for a GPU: `python benchmarks/skinny_gemm_sweep.py [--quick] [--json OUT]`.
"""

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton

from pagedllm.kernels.triton import pdl, skinny_gemm

SHAPES = {"0.6B qkv": (4096, 1024), "0.6B o": (1024, 2048), "0.6B gate_up": (6144, 1024),
          "0.6B down": (1024, 3072), "8B qkv": (6144, 4096), "8B o": (4096, 4096),
          "8B gate_up": (24576, 4096), "8B down": (4096, 12288)}
STREAMED_BYTES = 256 << 20      # weights read per graph replay: several times L2


def graph_us(launches: list) -> float:
    """Microseconds per launch of a graph that runs `launches` in order."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in launches:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in launches:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * len(launches))


def skinny_launch(x, w, y, block_n, block_k, warps, stages):
    n, k = w.shape
    grid = (triton.cdiv(n, block_n),)

    def launch():
        skinny_gemm._skinny_kernel[grid](x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, GATED=False,
                                         num_warps=warps, num_stages=stages, **pdl.launch_options(x.device))
    return launch


def sweep_shape(name, n, k, configs):
    copies = max(4, STREAMED_BYTES // (n * k * 2))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    results = {"cublas": graph_us([lambda w=w: F.linear(x, w) for w in weights])}
    for bn, bk, warps, stages in configs:
        if bk > triton.next_power_of_2(k):
            continue
        launches = [skinny_launch(x, w, y, bn, bk, warps, stages) for w in weights]
        us = graph_us(launches)
        launches[0]()
        err = (y.float() - ref).abs().max().item()
        assert err < 0.05, (name, bn, bk, warps, stages, err)
        results[f"n{bn} k{bk} w{warps} s{stages}"] = us
    default = f"n{skinny_gemm.block_n(k)} k{skinny_gemm.BLOCK_K} w1 s1"
    best = sorted(results.items(), key=lambda kv: kv[1])
    mb = n * k * 2 / 1e6
    print(f"\n{name} (N={n}, K={k}, {n * k * 2 / 2**20:.1f} MiB, {copies} copies): cuBLAS {results['cublas']:.2f} us"
          f" ({mb / results['cublas']:.2f} TB/s); current {default}: {results.get(default, float('nan')):.2f} us")
    for key, us in best[:8]:
        print(f"  {key:22} {us:7.2f} us  {mb / us:5.2f} TB/s")
    del weights
    return {"shape": [n, k], "copies": copies, "us": results, "current": default}


def batched_cublas(n, k, m):
    copies = max(2, STREAMED_BYTES // (n * k * 2))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    us = graph_us([lambda w=w: F.linear(x, w) for w in weights])
    return us, 2 * m * n * k / us / 1e6, n * k * 2 / us / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small grid (for a smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    grid = ([4, 8], [512], [4], [1, 3]) if args.quick else \
        ([2, 4, 8, 16, 32], [128, 256, 512, 1024, 2048], [1, 2, 4, 8], [1, 3])
    configs = list(itertools.product(*grid))
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "configs": len(configs), "shapes": {}, "batched": {}}
    for name, (n, k) in SHAPES.items():
        out["shapes"][name] = sweep_shape(name, n, k, configs)
        print(f"  ({time.time() - t0:.0f} s so far)", flush=True)
    print("\ncuBLAS on 8B shapes, in graphs: us, TFLOP/s, weight TB/s")
    for name, (n, k) in SHAPES.items():
        if name.startswith("8B"):
            for m in (128, 256):
                us, tflops, tbs = batched_cublas(n, k, m)
                out["batched"][f"{name} M={m}"] = {"us": us, "tflops": tflops, "weight_tbs": tbs}
                print(f"  {name:12} M={m:3} {us:8.2f} us {tflops:7.1f} TFLOP/s {tbs:5.2f} TB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
