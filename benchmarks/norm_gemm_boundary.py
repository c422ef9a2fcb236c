"""What the kernel boundary between an RMSNorm (with its residual add) and the small GEMM after it costs
in CUDA graphs, at 1 and 16 rows: [norm -> GEMM] against [GEMM] alone, each on other weights every
launch. The most that fusing the norm into the GEMM's prologue could save. On the H200: 0.9-2.3 us a
boundary (results/h200/norm-gemm-boundary-f73cb59.txt), some 70-150 us of Qwen3-8B's 4.6-ms step.
A development tool for a GPU: `python benchmarks/norm_gemm_boundary.py`."""

import torch
from skinny_gemm_sweep import STREAMED_BYTES, graph_us

from pagedllm.kernels.triton import small_gemm
from pagedllm.kernels.triton.rms_norm import rms_norm


def main() -> None:
    for name, hidden, n, silu in (("8B qkv", 4096, 6144, False), ("8B gate_up", 4096, 24576, True),
                                  ("0.6B qkv", 1024, 4096, False), ("0.6B gate_up", 1024, 6144, True)):
        for rows in (1, 16):
            copies = max(4, STREAMED_BYTES // (n * hidden * 2))
            ws = [torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5 for _ in range(copies)]
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
            r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
            nw = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
            gemm = graph_us([lambda w=w: small_gemm.small_linear(x, w, silu_and_mul=silu) for w in ws])
            both = graph_us([lambda w=w: small_gemm.small_linear(rms_norm(x, nw, 1e-6, r)[0], w, silu_and_mul=silu)
                             for w in ws])
            norm = graph_us([lambda: rms_norm(x, nw, 1e-6, r) for _ in ws])
            print(f"{name} rows {rows}: GEMM {gemm:.2f} us, norm+GEMM {both:.2f} us (boundary {both - gemm:+.2f}), "
                  f"norm alone {norm:.2f} us", flush=True)


if __name__ == "__main__":
    main()
