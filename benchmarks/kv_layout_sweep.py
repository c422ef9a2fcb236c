"""Does the K/V pool's memory order change how fast decode attention reads it? The kernels take the pool
as a [num_blocks, block_size, kv_heads, head_dim] view and address it by strides, so the same kernels
run on other storage orders unchanged; this times them on three:
  block-major  [blocks, block_size, kv_heads, dim] (the pool today): one KV head's 16 positions of a
               block are 16 rows of 256 bytes, 2 KB apart (the other heads' rows between them)
  head-major   [blocks, kv_heads, block_size, dim]: a KV head's block is 4 KB in one piece
  paired       [blocks, 2, kv_heads, block_size, dim]: head-major with a block's K and V side by side
decode_attention with the engine's own split count and tiles, on nano's mid-run spreads of contexts
(bench_kernels.py's shapes), timed as CUDA-graph replays, alternating layouts over several rounds;
the prefill kernel on 8 x 512 tokens too. Checks that every layout gives the same output.
    python benchmarks/kv_layout_sweep.py [--rounds N]
"""
import argparse
import math

import torch
from triton.testing import do_bench_cudagraph

from pagedllm.kernels.triton import paged_attention as pa

HEADS, KV_HEADS, DIM, BLOCK, DTYPE = 16, 8, 128, 16, torch.bfloat16
MAX_MODEL_LEN = 4096
SHAPES = [(256, (200, 2048)), (128, (200, 2048)), (48, (500, 2048)), (256, (1000, 1000))]


def layouts(num_blocks: int, block: int) -> dict:
    """name -> (k_cache, v_cache): views in the kernels' logical order over differently ordered storage."""
    logical = (0, 2, 1, 3)           # [blocks, kv_heads, block, dim] -> [blocks, block, kv_heads, dim]
    paired = torch.empty(num_blocks, 2, KV_HEADS, block, DIM, device="cuda", dtype=DTYPE)
    return {
        "block-major": (torch.empty(num_blocks, block, KV_HEADS, DIM, device="cuda", dtype=DTYPE),
                        torch.empty(num_blocks, block, KV_HEADS, DIM, device="cuda", dtype=DTYPE)),
        "head-major": tuple(torch.empty(num_blocks, KV_HEADS, block, DIM, device="cuda", dtype=DTYPE).permute(logical)
                            for _ in range(2)),
        "paired": (paired[:, 0].permute(logical), paired[:, 1].permute(logical)),
    }


def inputs(lens: list[int], block: int):
    """Random K/V in every layout (the same values), a shuffled block table and a query."""
    per_seq = [math.ceil(n / block) for n in lens]
    num_blocks = sum(per_seq) + 16
    k_ref = torch.randn(num_blocks, block, KV_HEADS, DIM, device="cuda", dtype=DTYPE)
    v_ref = torch.randn_like(k_ref)
    caches = layouts(num_blocks, block)
    for k, v in caches.values():
        k.copy_(k_ref)
        v.copy_(v_ref)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    table = torch.zeros(len(lens), max(per_seq), dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = perm[at:at + n]
        at += n
    return caches, table


def decode(batch: int, span: tuple[int, int], rounds: int, gen: torch.Generator) -> None:
    lens = torch.randint(span[0], span[1] + 1, (batch,), generator=gen).tolist()
    caches, table = inputs(lens, BLOCK)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, HEADS, DIM, device="cuda", dtype=DTYPE)
    kv_bytes = sum(lens) * KV_HEADS * DIM * 2 * 2
    outs, times = {}, {name: [] for name in caches}
    for _ in range(rounds):
        for name, (k, v) in caches.items():
            out = torch.empty_like(query)

            def fn(k=k, v=v, out=out):
                pa.decode_attention(query, k, v, seq_lens, table, DIM ** -0.5, MAX_MODEL_LEN, out=out)
            times[name].append(do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3)
            outs[name] = out
    ref = outs["block-major"].float()
    for name, us in times.items():
        best = min(us)
        err = (outs[name].float() - ref).abs().max().item()
        print(f"decode B={batch:3} ctx {span[0]}-{span[1]:4}  {name:12} {best:7.1f} us (rounds: "
              f"{', '.join(f'{t:.1f}' for t in us)})  {kv_bytes / best / 1e3:6.0f} GB/s  max diff {err:.2e}",
              flush=True)


def prefill(num_seqs: int, q_len: int, rounds: int) -> None:
    caches, table = inputs([q_len] * num_seqs, BLOCK)
    cu = torch.arange(0, (num_seqs + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device="cuda")
    query = torch.randn(num_seqs * q_len, HEADS, DIM, device="cuda", dtype=DTYPE)
    times = {name: [] for name in caches}
    for _ in range(rounds):
        for name, (k, v) in caches.items():
            def fn(k=k, v=v):
                pa.paged_attention(query, k, v, cu, seq_lens, table, DIM ** -0.5, q_len, q_len)
            times[name].append(do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3)
    for name, us in times.items():
        print(f"prefill {num_seqs} x {q_len}  {name:12} {min(us):7.1f} us (rounds: "
              f"{', '.join(f'{t:.1f}' for t in us)})", flush=True)


def copy_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench_cudagraph(lambda: dst.copy_(src), rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, f"copy {copy_gbs():.0f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    for batch, span in SHAPES:
        decode(batch, span, args.rounds, gen)
    prefill(8, 512, args.rounds)


if __name__ == "__main__":
    main()
