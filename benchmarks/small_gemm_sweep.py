"""Which blocks make the small-batch GEMM (kernels/triton/small_gemm.py) fastest, and whether it beats
what runs without it, timed the way the decode graphs run it: launches back to back inside one CUDA
graph, each on another copy of the weights so that L2 never holds them, with programmatic dependent
launch between ours as in the model. The gate/up projection includes SiLU-and-mul (ours in its
epilogue, else a separate kernel). Against cuBLAS for 2 rows or more; for one row against the skinny
kernel (the down projection's activation then in its loads, not in gate/up's epilogue). Then each
model's whole decode GEMM work in one graph (every layer's four GEMMs on that layer's own weights)
at each batch: cuBLAS and the activation kernel, as before, against linear() as the MLP calls it.

A development tool for a GPU: `python benchmarks/small_gemm_sweep.py [--quick] [--json OUT]`.
"""

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton

from pagedllm.kernels.triton import skinny_gemm, small_gemm
from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.linear import activation_in_gate_up, linear
from skinny_gemm_sweep import SHAPES, STREAMED_BYTES, graph_us

ROWS = (1, 2, 8, 16, 32, 64)
LARGE_ROWS = (96, 128, 192, 256)   # `--large`: a large decode batch's rows, where cuBLAS runs today
STEP_ROWS = (1, 2, 8, 16, 32, 48, 64)
MODELS = {"0.6B": (28, 1024, 2048, 3072), "8B": (36, 4096, 4096, 12288)}   # layers, hidden, q width, inter


def candidates(m: int, n: int, silu: bool, quick: bool) -> list[dict]:
    """Tiles no taller than the batch needs (16 at least: tl.dot's smallest), stages that fit; past 64
    rows, tiles of 64 or 128 rows (8 warps for 128) and shorter K tiles."""
    tallest = max(16, triton.next_power_of_2(m))
    if quick:
        grid = ((16, 64), (32,), (128,), (3,))
    elif m > 64:
        grid = ((64, 128), (32, 64, 128), (64, 128), (3, 4))
    else:
        grid = ((16, 32, 64), (16, 32, 64, 128), (128, 256), (3, 5))
    out = []
    for bm, bn, bk, stages in itertools.product(*grid):
        stage = small_gemm.stage_bytes(bm, bn, bk, silu)
        if bm <= tallest and bn <= triton.next_power_of_2(n) and stage * (stages + 1) <= small_gemm.SHARED_MEMORY:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages,
                            num_warps=8 if bm == 128 else 4))
    return out


def key(cfg: dict) -> str:
    return f"m{cfg['BLOCK_M']} n{cfg['BLOCK_N']} k{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


def baseline(x: torch.Tensor, w: torch.Tensor, silu: bool):
    """The other choice: cuBLAS, or for one row the skinny kernel (the MLP's activation then in the
    down projection's loads)."""
    if x.shape[0] == 1:
        gated = not silu and x.shape[1] == 2 * w.shape[1]
        return lambda: skinny_gemm.skinny_linear(x, w, gated)
    return (lambda: silu_and_mul(F.linear(x, w))) if silu else (lambda: F.linear(x, w))


def sweep(name: str, n: int, k: int, m: int, quick: bool) -> dict:
    silu = name.endswith("gate_up")
    copies = max(4, STREAMED_BYTES // (n * k * 2))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = (silu_and_mul(F.linear(x, weights[0])) if silu else F.linear(x, weights[0])).float()
    x_base = torch.cat([x, x], dim=1) if m == 1 and name.endswith("down") else x   # skinny: [gate | up]
    us = {"baseline": graph_us([baseline(x_base, w, silu) for w in weights])}
    outputs = n // 2 if silu else n
    for cfg in candidates(m, outputs, silu, quick):
        try:
            got = small_gemm.small_linear(x, weights[0], silu, **cfg).float()
        except triton.runtime.errors.OutOfResources:
            continue
        assert (got - ref).abs().max().item() < 0.125, (name, m, cfg)
        us[key(cfg)] = graph_us([lambda w=w, cfg=cfg: small_gemm.small_linear(x, w, silu, **cfg) for w in weights])
    best = min((kv for kv in us.items() if kv[0] != "baseline"), key=lambda kv: kv[1])
    default = small_gemm.config(m, outputs, k, silu)
    us["config()"] = graph_us([lambda w=w: small_gemm.small_linear(x, w, silu, **default) for w in weights])
    mb = n * k * 2 / 1e6
    print(f"{name:12} M={m:3}  {'skinny' if m == 1 else 'cuBLAS'} {us['baseline']:6.2f}  config() {us['config()']:6.2f}"
          f" ({key(default)})  best {best[1]:6.2f} ({best[0]}, {mb / best[1]:.2f} TB/s)", flush=True)
    return {"us": us, "best": best[0], "config": key(default), "copies": copies}


def model_weights(name: str) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's qkv, o, gate_up and down weights."""
    layers, hidden, q_width, inter = MODELS[name]
    shapes = ((q_width + 2 * 8 * 128, hidden), (hidden, q_width), (2 * inter, hidden), (hidden, inter))
    return [tuple(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for n, k in shapes)
            for _ in range(layers)]


def layer_launches(x: dict, layer: tuple, ours: bool) -> list:
    """One layer's GEMMs: cuBLAS and the activation kernel, or linear() as the model calls it."""
    qkv, o, gate_up, down = layer
    if not ours:
        return [lambda: F.linear(x["hidden"], qkv), lambda: F.linear(x["attn"], o),
                lambda: F.linear(x["hidden"], gate_up), lambda: F.linear(silu_and_mul(x["gate|up"]), down)]
    if activation_in_gate_up(x["hidden"], gate_up):
        mlp = [lambda: linear(x["hidden"], gate_up, activate=True), lambda: linear(x["act"], down)]
    else:
        mlp = [lambda: linear(x["hidden"], gate_up), lambda: linear(x["gate|up"], down, gated=True)]
    return [lambda: linear(x["hidden"], qkv), lambda: linear(x["attn"], o)] + mlp


def model_step(weights: list, m: int, ours: bool) -> float:
    """Microseconds for all of one decode step's layer GEMMs (no attention, norms or LM head)."""
    qkv, o, gate_up, down = weights[0]
    widths = {"hidden": qkv.shape[1], "attn": o.shape[1], "act": down.shape[1], "gate|up": gate_up.shape[0]}
    x = {name: torch.randn(m, width, device="cuda", dtype=torch.bfloat16) for name, width in widths.items()}
    launches = [fn for layer in weights for fn in layer_launches(x, layer, ours)]
    return graph_us(launches) * len(launches)


def step_table(out: dict) -> None:
    print("\nA decode step's layer GEMMs, us: cuBLAS + SiLU-and-mul vs linear() as the MLP calls it")
    for name in MODELS:
        weights = model_weights(name)
        for m in STEP_ROWS:
            cublas, ours = model_step(weights, m, ours=False), model_step(weights, m, ours=True)
            out["steps"][f"{name} M={m}"] = {"cublas": cublas, "ours": ours}
            print(f"  {name:5} M={m:3}  {cublas:8.1f}  {ours:8.1f}  ({ours / cublas:.3f})", flush=True)
        del weights
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small grid (for a smoke test)")
    parser.add_argument("--large", action="store_true", help=f"rows {LARGE_ROWS} instead of {ROWS}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {}, "steps": {}}
    rows = LARGE_ROWS if args.large else ROWS
    for (name, (n, k)), m in itertools.product(SHAPES.items(), rows[:3] if args.quick else rows):
        out["shapes"][f"{name} M={m}"] = sweep(name, n, k, m, args.quick)
    print(f"({time.time() - t0:.0f} s)")
    if not args.large:   # linear() leaves larger batches to cuBLAS: no step table to compare there
        step_table(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
