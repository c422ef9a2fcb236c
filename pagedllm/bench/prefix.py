"""`pagedllm bench prefix`: the shared-prefix workload with prefix caching on, then off, in one process.

DESIGN.md's workload: 10 system prompts of 768 tokens, each followed by 256 unique tokens (75% of
prompt tokens cacheable), 128 output tokens, ignore_eos, greedy. Two LLM instances are built one after
the other (enable_prefix_caching is a constructor flag); the first is deleted (and the CUDA cache
emptied) before the second is built. Each mode is timed `--repeats` times from an empty cache and
the last run is reported (all elapsed times are kept), so one-off costs of a first run (compiling
for shapes the warm-up missed) show up instead of biasing whichever mode runs first. The hit rate
is the engine's prefix_cache_hits / queries (prompt tokens) of the reported run.
"""

import gc

import torch

from pagedllm.bench import workloads
from pagedllm.bench.roofline import measure_bandwidth
from pagedllm.bench.throughput import run_llm, run_llm_roofline


def run_prefix_mode(make_llm, enable: bool, args, bandwidth: float | None) -> dict:
    llm = make_llm(enable)
    try:
        engine = llm.llm_engine
        vocab = engine.vocab_size
        reqs = workloads.prefix_requests(vocab, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                                         unique_len=args.unique_len, per_prefix=args.per_prefix,
                                         output_len=args.output_len, seed=args.seed_workload)
        # warm-up: a small copy of the workload on other tokens, twice, so that with caching on
        # the second pass has the timed run's mix (chunks after cached prefixes beside whole
        # prompts) and kernels and compiled code are ready for it; then forget its blocks
        warm = workloads.prefix_requests(vocab, num_prefixes=2, prefix_len=args.prefix_len,
                                         unique_len=args.unique_len, per_prefix=6, output_len=8, seed=12345)
        for _ in range(2):
            run_llm(llm, warm, 0.0)
        if bandwidth is None:
            bandwidth = measure_bandwidth(engine.config.device)["bandwidth_bytes_per_s"]
        elapsed = []
        for _ in range(args.repeats):   # each from an empty cache; the last one is reported
            engine.reset_prefix_cache()
            before = engine.get_stats()
            row = run_llm_roofline(llm, reqs, 0.0, bandwidth)
            elapsed.append(row["elapsed_s"])
        after = engine.get_stats()
        hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        row["elapsed_s_each_repeat"] = elapsed
        row.update({"prefix_caching": enable, "prefix_cache_hits": hits, "prefix_cache_queries": queries,
                    "hit_rate": hits / queries if queries else 0.0,
                    "cacheable_fraction": args.prefix_len / (args.prefix_len + args.unique_len)})
        row["model"] = engine.config.model.model
        row["dtype"] = engine.config.model.dtype
        row["device_str"] = engine.config.device
        return row
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
