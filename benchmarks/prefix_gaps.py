"""Where the device waits for the host in the prefix-hit75 workload with caching on: the kernels'
intervals from torch.profiler, merged; the gaps over 50 us between them; and when the host launched
each engine step (execute_model's start, how long it took, requests and tokens). A development tool
for a GPU: `python benchmarks/prefix_gaps.py` (Qwen3-0.6B, dummy weights)."""

import time

from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM
from pagedllm.bench import workloads
from pagedllm.bench.throughput import run_llm


def stamp_launches(core) -> list[tuple]:
    """Record (start, end, requests, tokens) of every execute_model call of the engine core."""
    launches = []
    execute = core.executor.execute_model

    def stamped(out):
        start = time.perf_counter()
        result = execute(out)
        launches.append((start, time.perf_counter(), len(out.request_ids), sum(out.num_scheduled_tokens)))
        return result

    core.executor.execute_model = stamped
    return launches


def busy_intervals(prof) -> list[list[float]]:
    """The device kernels' [start, end] intervals (us), overlapping ones merged."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    merged: list[list[float]] = []
    for start, end in kernels:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def main() -> None:
    llm = LLM("Qwen/Qwen3-0.6B", load_format="dummy", dtype="bfloat16", max_model_len=4096,
              gpu_memory_utilization=0.45, enable_prefix_caching=True)
    engine = llm.llm_engine
    reqs = workloads.prefix_requests(engine.vocab_size, num_prefixes=4, prefix_len=768, unique_len=256,
                                     per_prefix=50, output_len=10, seed=0)
    warm = workloads.prefix_requests(engine.vocab_size, num_prefixes=2, prefix_len=768, unique_len=256,
                                     per_prefix=6, output_len=8, seed=12345)
    for _ in range(2):
        run_llm(llm, warm, 0.0)
    for rep in range(2):
        engine.reset_prefix_cache()
        print(f"run {rep}: {run_llm(llm, reqs, 0.0)['elapsed_s']:.4f} s", flush=True)
    launches = stamp_launches(engine.engine_core.core)
    engine.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t_start = time.perf_counter()
        elapsed = run_llm(llm, reqs, 0.0)["elapsed_s"]
        t_end = time.perf_counter()
    print(f"profiled run: {elapsed:.4f} s, {len(launches)} steps")
    merged = busy_intervals(prof)
    busy = sum(end - start for start, end in merged)
    span = merged[-1][1] - merged[0][0]
    print(f"GPU busy {busy / 1e3:.1f} ms over a kernel span of {span / 1e3:.1f} ms "
          f"(idle inside {(span - busy) / 1e3:.1f} ms)")
    gaps = [(a[1], b[0] - a[1]) for a, b in zip(merged, merged[1:]) if b[0] - a[1] > 50]
    print(f"{len(gaps)} gaps > 50 us, {sum(g for _, g in gaps) / 1e3:.1f} ms in all:")
    for at, gap in gaps:
        print(f"  at {(at - merged[0][0]) / 1e3:7.2f} ms: {gap / 1e3:.2f} ms")
    print("steps (host, ms from the first launch): start, launch took, requests, tokens")
    for start, end, requests, tokens in launches:
        print(f"  {1e3 * (start - launches[0][0]):7.2f} {1e3 * (end - start):6.2f} {requests:4d} {tokens:6d}")
    print(f"host: generate start -> first launch {1e3 * (launches[0][0] - t_start):.2f} ms; "
          f"last launch end -> generate end {1e3 * (t_end - launches[-1][1]):.2f} ms")
    llm.shutdown()


if __name__ == "__main__":
    main()
