"""Why does Qwen3-8B's down projection add ~32 us to a batch-1 decode step after gate/up (the trace of
decode_critical_path.py) when it streams its 100 MB in ~26.7 us back to back with itself? In CUDA
graphs, on other weights every launch: gate/up alone, down alone, and the pair gate/up -> down as the
MLP runs it, for the down projection's config() and variants of it. The pair minus gate/up alone is
what down adds after gate/up. A development tool for a GPU: `python benchmarks/mlp_pair_sweep.py`."""

import json

import torch
from skinny_gemm_sweep import graph_us

from pagedllm.kernels.triton import small_gemm

HIDDEN, INTERMEDIATE, COPIES = 4096, 12288, 8
VARIANTS = {"config()": {}, "no PDL": dict(overlap=False), "BLOCK_N 64": dict(BLOCK_N=64),
            "BLOCK_K 128": dict(BLOCK_K=128), "3 stages": dict(num_stages=3), "8 warps": dict(num_warps=8),
            "BLOCK_N 16": dict(BLOCK_N=16), "BLOCK_K 512 s3": dict(BLOCK_K=512, num_stages=3)}


def main() -> None:
    gate_up = [torch.randn(2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN ** 0.5
               for _ in range(COPIES)]
    down = [torch.randn(HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) / INTERMEDIATE ** 0.5
            for _ in range(COPIES)]
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    h = small_gemm.small_linear(x, gate_up[0], silu_and_mul=True)
    alone_gu = graph_us([lambda g=g: small_gemm.small_linear(x, g, silu_and_mul=True) for g in gate_up])
    print(f"config(): {small_gemm.config(1, HIDDEN, INTERMEDIATE)}; gate/up alone {alone_gu:.2f} us", flush=True)
    best = (float("inf"), {})
    for name, override in VARIANTS.items():
        try:
            alone = graph_us([lambda d=d: small_gemm.small_linear(h, d, **override) for d in down])
            pair = graph_us([lambda g=g, d=d: small_gemm.small_linear(
                small_gemm.small_linear(x, g, silu_and_mul=True), d, **override) for g, d in zip(gate_up, down)])
        except Exception as e:     # noqa: BLE001 - a variant that does not compile or fit
            print(f"down {name:14s}: {type(e).__name__}", flush=True)
            continue
        print(f"down {name:14s}: alone {alone:6.2f} us, gate/up -> down {pair:6.2f} us a pair, "
              f"down adds {pair - alone_gu:6.2f}", flush=True)
        best = min(best, (pair, override), key=lambda b: b[0])
    print("best override:", json.dumps(best[1]))


if __name__ == "__main__":
    main()
