"""In which order decode attention's programs should take the sequences. The GPU hands out a grid's
programs roughly in index order, and the split kernel's slowest axis is the sequence: with contexts of
different lengths, the long sequences' programs, if they come last, run on after the rest have ended.
Times decode_attention on nano's mid-run spreads of contexts (CUDA-graph replays, alternating over
rounds) four ways: the batch as it comes; the batch itself sorted longest first (the bound); the
batch as it comes with seq_order naming the sequences longest first (what the engine can pass); and
seq_order = identity (what the extra load alone costs).
    python benchmarks/decode_order_sweep.py [--rounds N]
"""
import argparse

import torch
from triton.testing import do_bench_cudagraph

from kv_layout_sweep import DIM, HEADS, KV_HEADS, inputs
from pagedllm.kernels.triton import paged_attention as pa

MAX_MODEL_LEN = 4096
SHAPES = [(256, (200, 2048)), (192, (300, 2048)), (128, (200, 2048)), (96, (400, 2048)), (48, (500, 2048)),
          (24, (600, 2048)), (8, (800, 2048)), (256, (1000, 1000))]


def launchers(lens: list[int], orders: dict) -> dict:
    """name -> (graph-replay function, output) on one batch, one per seq_order in `orders` (None: none)."""
    caches, table = inputs(lens, 16)
    k, v = caches["block-major"]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    query = torch.randn(len(lens), HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    splits = pa._num_splits(len(lens), KV_HEADS, MAX_MODEL_LEN, query.device)
    cfg = pa._decode_config(len(lens), KV_HEADS, False, query.device)
    out = {}
    for name, order in orders.items():
        seq_order = None if order is None else torch.tensor(order, dtype=torch.int32, device="cuda")
        result = torch.empty_like(query)

        def fn(seq_order=seq_order, result=result):
            pa._decode_attention_launch(query, k, v, seq_lens, table, DIM ** -0.5, result, splits, **cfg,
                                        seq_order=seq_order)
        fn()
        out[name] = (fn, result)
    return out


def sweep(batch: int, span: tuple[int, int], rounds: int, gen: torch.Generator) -> None:
    lens = torch.randint(span[0], span[1] + 1, (batch,), generator=gen).tolist()
    longest_first = sorted(range(batch), key=lambda i: -lens[i])
    variants = launchers(lens, {"as it comes": None, "seq_order": longest_first,
                                "identity order": list(range(batch))})
    variants |= launchers([lens[i] for i in longest_first], {"batch sorted": None})
    assert torch.equal(variants["seq_order"][1], variants["as it comes"][1])
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, _) in variants.items():
            times[name].append(do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3)
    base = min(times["as it comes"])
    kv_bytes = sum(lens) * KV_HEADS * DIM * 2 * 2
    cells = [f"{name} {min(us):6.1f} us ({min(us) / base:.3f}x, {kv_bytes / min(us) / 1e3:.0f} GB/s)"
             for name, us in times.items()]
    print(f"B={batch:3} ctx {span[0]}-{span[1]:4}: " + "; ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    gen = torch.Generator().manual_seed(0)
    for batch, span in SHAPES:
        sweep(batch, span, args.rounds, gen)


if __name__ == "__main__":
    main()
