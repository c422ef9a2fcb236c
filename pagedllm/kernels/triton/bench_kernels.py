"""Microbenchmark of the Triton attention and sampling kernels on one GPU (Qwen3-0.6B shapes).

  python3 pagedllm/kernels/triton/bench_kernels.py [--out LOG] [--only decode|prefill|sampler|cascade ...]

(a) decode_attention, 16 heads / 8 kv heads / head_dim 128, bf16, block 16: batch 256 at context
    1000, batch 1 at 512 and 4096, and batches of 256, 128 and 48 with contexts spread as in the
    middle of a nano run (uniform 200-2048, 500-2048). Reports achieved GB/s of K/V read (each context
    token's K and V rows read once) next to the device-to-device copy bandwidth measured in the same run.
(b) paged_attention prefill of 8 x 512 tokens (and 2 x 4096), against torch SDPA on the same data
    laid out densely (K/V repeated to 16 heads so the flash backend applies).
Each shape also sweeps a few tile configs (and, for decode, split counts) through the private
launchers; rows marked * are what the public functions pick. Times are medians of triton.testing.do_bench (L2 flushed
before every call); 'graph' is a CUDA-graph replay (launch overhead removed, L2 may be warm).
(c) sample_tokens on bf16 logits of vocab 151936 at batch 1, 64 and 256, temperature 0.6, against
    the torch ops it replaces (upcast, / T, softmax, exponential_, p / q, argmax); GB/s of logits
    read once. The 'greedy' row (temperature 0: no Philox) is the kernel's pure-bandwidth floor.
(d) cascade decode: B sequences on a few 768-token system prompts (contexts ~1,030-1,100), three
    ways: every sequence with its own blocks, the prefix blocks shared (each sequence still reads
    them; the L2 cache may serve repeats), and shared with a cascade plan (worker/shared_prefix.py)
    so each prefix is read once per tile of sequences. TB/s = K/V bytes if every sequence read its
    whole context / time.
On an H200, decode only: benchmarks/results/h200/decode-attention-sweep-h200.txt (docs/benchmarks.md).
Measured on an H100 80GB HBM3 (torch 2.11, triton 3.6, 1 GiB copy = 3.0 TB/s read+write):
  decode B=256 ctx 1000: 384 us eager / 370 us graph = 2.73 TB/s of K/V, 91% of copy bandwidth;
  B=1 ctx 4096: 9.3 us graph (64 splits; 1 split: 101 us); B=1 ctx 512: 6.2 us graph (launch-bound).
  Eager B=1 times are host-launch-bound and noisy. The mixed kernel on the B=256 decode batch: 386 us.
  prefill 8x512: 66 us = 131 TFLOP/s (SDPA flash on dense data: 38 us); 2x4096: 506 us = 272 TFLOP/s
  (SDPA: 270 us); before the causal mask was limited to the diagonal tiles (commit 715b59c): 68 and
  604 us. Tile configs in the sweeps were within ~5% of the defaults.
  sample_tokens, vocab 151936 bf16: B=256 75 us eager / 69 us graph (torch ops: 783 / 769 us; the
  greedy, Philox-free floor 45 / 33 us); B=64 27 / 20 us (torch 243 / 231); B=1 9.1 / 3.6 us (torch 71 / 58).
  cascade decode, graph us (own blocks / shared blocks read per sequence / cascade): B=100 on 10
  prompts 183 / 124 / 90; B=200 on 4 prompts 300 / 178 / 117; B=256 on 8 prompts 373 / 218 / 139.
"""

import argparse
import math

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from pagedllm.kernels import torch_ref
from pagedllm.kernels.triton import paged_attention as pa
from pagedllm.kernels.triton import sampling

DEVICE = "cuda"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 16, 8, 128, 16, torch.bfloat16
MAX_MODEL_LEN = 40960          # Qwen3-0.6B's max_position_embeddings
# (batch, context or (shortest, longest) context: nano's mid-run spread, uniform, seeded)
DECODE_SHAPES = [(256, 1000), (1, 512), (1, 4096), (256, (200, 2048)), (128, (200, 2048)), (48, (500, 2048))]
PREFILL_SHAPES = [(8, 512), (2, 4096)]                   # (sequences, tokens each)
DECODE_CONFIGS = [dict(block_n=64, num_warps=4, num_stages=2), dict(block_n=32, num_warps=4, num_stages=3),
                  dict(block_n=64, num_warps=4, num_stages=3), dict(block_n=128, num_warps=4, num_stages=2),
                  dict(block_n=128, num_warps=8, num_stages=2), dict(block_n=64, num_warps=4, num_stages=4),
                  dict(block_n=64, num_warps=8, num_stages=3)]
VOCAB, TEMPERATURE = 151936, 0.6                         # Qwen3's vocabulary, its suggested temperature
SAMPLE_BATCHES = [1, 64, 256]
SAMPLE_CONFIGS = [dict(block=1024, num_warps=4), dict(block=2048, num_warps=4), dict(block=4096, num_warps=4),
                  dict(block=4096, num_warps=8), dict(block=8192, num_warps=8)]
PREFILL_CONFIGS = [dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
                   dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
                   dict(block_m=128, block_n=64, num_warps=8, num_stages=2),
                   dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
                   dict(block_m=128, block_n=32, num_warps=4, num_stages=3),
                   dict(block_m=64, block_n=32, num_warps=4, num_stages=3),
                   dict(block_m=128, block_n=128, num_warps=8, num_stages=2)]


def _paged_inputs(seq_lens):
    """Pool with shuffled block ids, one block table row per sequence."""
    blocks_per_seq = [math.ceil(n / BLOCK) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 16
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=DEVICE)
    pos = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[pos:pos + n]
        pos += n
    return k_cache, v_cache, table


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _decode_ref(query, k_cache, v_cache, table, lens, scale):
    """Dense fp32 reference on the GPU (torch_ref builds its masks on the CPU)."""
    group = HEADS // KV_HEADS
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for i, ctx in enumerate(lens):
        k = torch_ref.gather_kv(k_cache, table[i], ctx).float().repeat_interleave(group, 1).transpose(0, 1)
        v = torch_ref.gather_kv(v_cache, table[i], ctx).float().repeat_interleave(group, 1).transpose(0, 1)
        probs = torch.softmax(torch.einsum("hd,hkd->hk", query[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hk,hkd->hd", probs, v)
    return out


def bench_decode(log, copy_gbs):
    """Every tile config at the default split count, then the default tile config at other split counts."""
    rows = []
    for batch, ctx in DECODE_SHAPES:
        lens = [ctx] * batch if isinstance(ctx, int) else torch.randint(ctx[0], ctx[1] + 1, (batch,)).tolist()
        ctx = ctx if isinstance(ctx, int) else f"{ctx[0]}-{ctx[1]}"
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        k_cache, v_cache, table = _paged_inputs(lens)
        query = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        out = torch.empty_like(query)
        scale = HEAD_DIM ** -0.5
        ref = _decode_ref(query, k_cache, v_cache, table, lens, scale)
        kv_bytes = sum(lens) * KV_HEADS * HEAD_DIM * k_cache.element_size() * 2
        default_splits = pa._num_splits(batch, KV_HEADS, MAX_MODEL_LEN, query.device)
        default_cfg = pa._decode_config(batch, KV_HEADS, False, query.device)
        variants = [(default_splits, default_cfg)] + [(default_splits, c) for c in DECODE_CONFIGS if c != default_cfg]
        if batch >= 48:     # few splits, each with every tile config
            variants += [(s, cfg) for s in (1, 2, 3, 4) if s != default_splits for cfg in DECODE_CONFIGS]
        else:
            variants += [(s, DECODE_CONFIGS[0]) for s in (1, 2, 4, 8, 16, 32, 64) if s != default_splits]
        for i, (splits, cfg) in enumerate(variants):
            def fn():
                pa._decode_attention_launch(query, k_cache, v_cache, seq_lens, table, scale, out, splits, **cfg)
            try:
                out.fill_(float("nan"))
                fn()
                err = _rel_err(out, ref)
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                graph_ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception as e:  # a config that fails to compile/launch is reported, not fatal
                log(f"decode B={batch} ctx={ctx} splits={splits} {cfg}: FAILED {type(e).__name__}: {e}")
                continue
            gbs = kv_bytes / ms / 1e6
            row = dict(batch=batch, ctx=ctx, splits=splits, cfg=cfg, us=ms * 1e3, graph_us=graph_ms * 1e3,
                       gbs=gbs, frac=gbs / copy_gbs, err=err, default=i == 0)
            log(f"decode {row}")
            rows.append(row)
        # the same batch through the mixed prefill/decode kernel (what a mixed batch's decode rows cost)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)

        def mixed():
            pa.paged_attention(query, k_cache, v_cache, cu, seq_lens, table, scale, 1, max(lens), out=out)
        out.fill_(float("nan"))
        mixed()
        err = _rel_err(out, ref)
        ms = do_bench(mixed, warmup=25, rep=200, return_mode="median")
        graph_ms = do_bench_cudagraph(mixed, rep=100, return_mode="median")
        gbs = kv_bytes / ms / 1e6
        rows.append(dict(batch=batch, ctx=ctx, splits="-", cfg=None, us=ms * 1e3, graph_us=graph_ms * 1e3,
                         gbs=gbs, frac=gbs / copy_gbs, err=err, default=False))
        log(f"decode via paged_attention {rows[-1]}")
    return rows


def bench_prefill(log):
    rows = []
    for num_seqs, q_len in PREFILL_SHAPES:
        k_cache, v_cache, table = _paged_inputs([q_len] * num_seqs)
        tokens = num_seqs * q_len
        query = torch.randn(tokens, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        cu = torch.arange(0, tokens + 1, q_len, dtype=torch.int32, device=DEVICE)
        seq_lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device=DEVICE)
        scale = HEAD_DIM ** -0.5
        out = torch.empty_like(query)
        # dense copy of the same data for SDPA: [B, H, L, D] with K/V repeated per query head
        group = HEADS // KV_HEADS
        qd = query.view(num_seqs, q_len, HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        kd = torch.stack([torch_ref.gather_kv(k_cache, table[i], q_len) for i in range(num_seqs)])
        vd = torch.stack([torch_ref.gather_kv(v_cache, table[i], q_len) for i in range(num_seqs)])
        kd = kd.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
        vd = vd.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        ref = sdpa().transpose(1, 2).reshape(tokens, HEADS, HEAD_DIM)
        flops = 4 * num_seqs * (q_len * (q_len + 1) // 2) * HEADS * HEAD_DIM
        sdpa_ms = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
        rows.append(dict(kind="sdpa", seqs=num_seqs, q_len=q_len, us=sdpa_ms * 1e3, tflops=flops / sdpa_ms / 1e9))
        log(f"prefill {rows[-1]}")
        for i, cfg in enumerate(PREFILL_CONFIGS):
            def fn():
                pa._paged_attention_launch(query, k_cache, v_cache, cu, seq_lens, table, scale, out, **cfg)
            try:
                out.fill_(float("nan"))
                fn()
                err = _rel_err(out, ref)
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            except Exception as e:
                log(f"prefill {num_seqs}x{q_len} {cfg}: FAILED {type(e).__name__}: {e}")
                continue
            rows.append(dict(kind="triton", seqs=num_seqs, q_len=q_len, cfg=cfg, us=ms * 1e3,
                             tflops=flops / ms / 1e9, err=err, default=i == 0))
            log(f"prefill {rows[-1]}")
    return rows


def _torch_sample(logits, temperature):
    """The torch sampler's draw for a batch with no truncation (Sampler._sample before the kernel)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def bench_sampler(log, copy_gbs):
    """The torch ops, the public sample_tokens, then every config through the private launcher."""
    rows = []
    for batch in SAMPLE_BATCHES:
        logits = torch.randn(batch, VOCAB, device=DEVICE).mul_(4).to(DTYPE)
        temperature = torch.full((batch,), TEMPERATURE, device=DEVICE)
        greedy = torch.zeros_like(temperature)
        out = torch.empty(batch, dtype=torch.int64, device=DEVICE)
        seed = 2 ** 40 + 1
        logits_bytes = logits.numel() * logits.element_size()
        greedy_ok = torch.equal(sampling.sample_tokens(logits, greedy, seed), logits.argmax(dim=-1))
        default = sampling._config(batch)
        variants = [("torch", lambda: _torch_sample(logits, temperature.unsqueeze(1)))]
        variants.append(("sample_tokens", lambda: sampling.sample_tokens(logits, temperature, seed)))
        variants += [(cfg, lambda cfg=cfg: sampling._sample_launch(logits, temperature, seed, out, **cfg))
                     for cfg in SAMPLE_CONFIGS]
        variants.append(("greedy", lambda: sampling._sample_launch(logits, greedy, seed, out, **default)))
        for what, fn in variants:
            try:
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                graph_ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception as e:
                log(f"sample B={batch} {what}: FAILED {type(e).__name__}: {e}")
                continue
            gbs = logits_bytes / ms / 1e6
            row = dict(batch=batch, what=what, us=ms * 1e3, graph_us=graph_ms * 1e3, gbs=gbs, frac=gbs / copy_gbs,
                       greedy_ok=greedy_ok, default=what == default)
            log(f"sample {row}")
            rows.append(row)
    return rows


CASCADE_SHAPES = [(100, 10, 1100), (200, 4, 1030), (256, 8, 1024)]   # (batch, system prompts, context)
CASCADE_PREFIX = 768


def _cascade_inputs(batch, prompts, ctx, layout):
    """Pool and block tables; sequence i is on system prompt i % prompts unless layout is 'unique'."""
    prefix_blocks, blocks = CASCADE_PREFIX // BLOCK, math.ceil(ctx / BLOCK)
    num_blocks = prompts * prefix_blocks + batch * blocks
    perm = torch.randperm(num_blocks).to(torch.int32)
    table = torch.empty(batch, blocks, dtype=torch.int32)
    own = iter(perm[prompts * prefix_blocks:].split(blocks if layout == "unique" else blocks - prefix_blocks))
    for i in range(batch):
        if layout == "unique":
            table[i] = next(own)
        else:
            p = i % prompts
            table[i] = torch.cat([perm[p * prefix_blocks:(p + 1) * prefix_blocks], next(own)])
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    return k_cache, torch.randn_like(k_cache), table


def bench_cascade(log):
    import numpy as np

    from pagedllm.worker.shared_prefix import plan_shared_prefixes
    rows = []
    scale = HEAD_DIM ** -0.5
    for batch, prompts, ctx in CASCADE_SHAPES:
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
        query = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
        for layout in ("unique", "shared", "cascade"):
            k_cache, v_cache, table = _cascade_inputs(batch, prompts, ctx, layout)
            plan = {}
            if layout == "cascade":
                found = plan_shared_prefixes(table.numpy(), np.full(batch, ctx), BLOCK,
                                             pa.shared_tile_seqs(HEADS, KV_HEADS))
                plan = {name: torch.from_numpy(getattr(found, name)).to(DEVICE)
                        for name in ("shared_lens", "tile_seqs", "tile_lens")}
            table = table.to(DEVICE)
            out, ref = torch.empty_like(query), torch.empty_like(query)
            pa.decode_attention(query, k_cache, v_cache, seq_lens, table, scale, 4096, out=ref)

            def fn():
                pa.decode_attention(query, k_cache, v_cache, seq_lens, table, scale, 4096, out=out, **plan)
            fn()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            graph_ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            row = dict(batch=batch, prompts=prompts, ctx=ctx, layout=layout, us=ms * 1e3, graph_us=graph_ms * 1e3,
                       tbs=kv_bytes / graph_ms / 1e9, err=_rel_err(out, ref),
                       tiles=len(plan["tile_lens"]) if plan else 0)
            log(f"cascade {row}")
            rows.append(row)
    return rows


def copy_bandwidth():
    """Device-to-device copy of 1 GiB, bytes read + written per second (the practical ceiling)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="also write the log here")
    parser.add_argument("--only", action="append", choices=["decode", "prefill", "sampler", "cascade"],
                        help="run only these parts (default: all)")
    args = parser.parse_args()
    parts = set(args.only or ["decode", "prefill", "sampler", "cascade"])
    sink = open(args.out, "w") if args.out else None

    def log(line):
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    torch.manual_seed(0)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    copy_gbs = copy_bandwidth()
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    results = {}
    for name, fn in (("decode", lambda: bench_decode(log, copy_gbs)), ("prefill", lambda: bench_prefill(log)),
                     ("sampler", lambda: bench_sampler(log, copy_gbs)), ("cascade", lambda: bench_cascade(log))):
        try:   # a failing part is reported and the others' tables still printed
            results[name] = fn() if name in parts else []
        except Exception as e:
            log(f"{name} FAILED {type(e).__name__}: {e}")
            results[name] = []
    decode, prefill, sample, cascade = (results[n] for n in ("decode", "prefill", "sampler", "cascade"))

    log("\n== decode_attention (Qwen3-0.6B 16/8 x 128, bf16, block 16, max_model_len %d) ==" % MAX_MODEL_LEN)
    log(f"{'B':>4} {'ctx':>5} {'splits':>6} {'block_n/warps/stages':>21} {'us':>8} {'graph us':>9} "
        f"{'GB/s':>7} {'% copy':>7} {'rel err':>8}")
    for r in decode:
        c = r["cfg"]
        tag = ("paged_attention  " if c is None else
               f"{c['block_n']}/{c['num_warps']}/{c['num_stages']}" + (" *" if r["default"] else "  "))
        log(f"{r['batch']:>4} {r['ctx']:>5} {r['splits']:>6} {tag:>21} {r['us']:>8.1f} {r['graph_us']:>9.1f} "
            f"{r['gbs']:>7.0f} {100 * r['frac']:>6.0f}% {r['err']:>8.1e}")
    log("\n== prefill (paged_attention vs dense SDPA, causal) ==")
    log(f"{'what':>28} {'us':>8} {'TFLOP/s':>8} {'rel err':>8}")
    for r in prefill:
        if r["kind"] == "sdpa":
            what = f"{r['seqs']}x{r['q_len']} sdpa"
            log(f"{what:>28} {r['us']:>8.1f} {r['tflops']:>8.0f}")
        else:
            c = r["cfg"]
            what = (f"{r['seqs']}x{r['q_len']} {c['block_m']}/{c['block_n']}/{c['num_warps']}/{c['num_stages']}"
                    + (" *" if r["default"] else "  "))
            log(f"{what:>28} {r['us']:>8.1f} {r['tflops']:>8.0f} {r['err']:>8.1e}")
    log(f"\n== sample_tokens (vocab {VOCAB}, bf16, temperature {TEMPERATURE}) vs torch ==")
    log(f"{'B':>4} {'what':>16} {'us':>8} {'graph us':>9} {'GB/s':>7} {'% copy':>7} {'greedy ok':>9}")
    for r in sample:
        w = r["what"]
        what = w if isinstance(w, str) else f"{w['block']}/{w['num_warps']}" + (" *" if r["default"] else "  ")
        log(f"{r['batch']:>4} {what:>16} {r['us']:>8.1f} {r['graph_us']:>9.1f} {r['gbs']:>7.0f} "
            f"{100 * r['frac']:>6.0f}% {str(r['greedy_ok']):>9}")
    log(f"\n== cascade decode ({CASCADE_PREFIX}-token system prompts, bf16, block {BLOCK}) ==")
    log(f"{'B':>4} {'prompts':>7} {'ctx':>5} {'layout':>8} {'tiles':>5} {'us':>8} {'graph us':>9} {'TB/s':>6} "
        f"{'rel err':>8}")
    for r in cascade:
        log(f"{r['batch']:>4} {r['prompts']:>7} {r['ctx']:>5} {r['layout']:>8} {r['tiles']:>5} {r['us']:>8.1f} "
            f"{r['graph_us']:>9.1f} {r['tbs']:>6.2f} {r['err']:>8.1e}")
    log("(* = what the public function picks; decode config = block_n/warps/stages, prefill = block_m/block_n/warps/stages,\n sampler = block/warps; 'paged_attention' = the decode batch through the mixed kernel)")


if __name__ == "__main__":
    main()
