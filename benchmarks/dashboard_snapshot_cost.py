"""What one dashboard poll costs the engine: `engine_snapshot` (run by the engine core between two
steps) and its JSON encoding, on realistic pools.

    python benchmarks/dashboard_snapshot_cost.py

Builds the real KVCacheManager + Scheduler bookkeeping (no model) filled like a busy server: the
running requests hold blocks (with a shared system-prompt prefix), requests wait, and the rest of the
pool holds cached-and-free prefix blocks. Prints microseconds per call (median of many): the first snapshot of a set of requests, and a
repeated one (the dashboard keeps each request's block ids as an array between polls).
"""

import json
import random
import statistics
import time
from types import SimpleNamespace

from pagedllm.config import SchedulerConfig
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.snapshot import ColourBook, engine_snapshot
from pagedllm.sampling_params import SamplingParams


def busy_engine(num_blocks: int, num_running: int, num_waiting: int, block_size: int = 16, seed: int = 0):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=max(num_running, 1), max_num_batched_tokens=8192, max_model_len=4096)
    scheduler = Scheduler(config, kv)
    params = SamplingParams(max_tokens=1024)
    system = [rng.randrange(32000) for _ in range(256)]
    # fill the cache with finished requests' prefix blocks (cached-and-free)
    i = 0
    while kv.num_free_blocks > num_blocks // 2 and i < 100_000:
        r = Request(f"old-{i}", [rng.randrange(32000) for _ in range(512)], params, 1024)
        if not kv.allocate_slots(r, r.num_tokens):
            break
        r.num_computed_tokens = r.num_tokens
        kv.cache_blocks(r)
        kv.free(r)
        i += 1
    for i in range(num_running):
        prompt = system + [rng.randrange(32000) for _ in range(rng.randint(100, 1024))]
        r = Request(f"chatcmpl-{i:06d}", prompt, params, 1024)
        cached = kv.find_cached_prefix(r)
        if not kv.allocate_slots(r, r.num_tokens - len(cached) * block_size, cached):
            break
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids = [rng.randrange(32000) for _ in range(rng.randint(0, 512))]
        scheduler.running.append(r)
        scheduler.requests[r.request_id] = r
    for i in range(num_waiting):
        scheduler.waiting.append(Request(f"wait-{i}", [1] * 300, params, 1024))
    model = SimpleNamespace(max_model_len=4096, dtype="bfloat16")
    executor = SimpleNamespace(capacity={"kv_bytes_per_token": 114688, "num_blocks": num_blocks,
                                         "block_size": block_size, "pool_bytes": num_blocks * block_size * 114688,
                                         "token_capacity": num_blocks * block_size,
                                         "max_concurrency_at_max_model_len": num_blocks / 256})
    return SimpleNamespace(kv_cache=kv, scheduler=scheduler, config=SimpleNamespace(model=model), executor=executor,
                           prompt_tokens=0, generation_tokens=0, finished={}, num_steps=0, step_time=0.0,
                           structured=SimpleNamespace(num_requests=0, compile_time=0.0))


def timeit(fn, min_time: float = 0.5) -> float:
    times = []
    deadline = time.perf_counter() + min_time
    while time.perf_counter() < deadline or len(times) < 20:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    print("| pool blocks | running | waiting | in use | cached | snapshot µs (first) | snapshot µs (repeated) "
          "| json.dumps µs | JSON bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num_blocks, running, waiting in [(4096, 16, 0), (4096, 64, 32), (35_000, 256, 256), (100_000, 256, 1000)]:
        engine = busy_engine(num_blocks, running, waiting)
        colours = ColourBook()
        snap = engine_snapshot(engine, colours)
        snap_us = timeit(lambda: engine_snapshot(engine, colours))
        id_cache: dict = {}
        warm_us = timeit(lambda: engine_snapshot(engine, colours, id_cache=id_cache))
        json_us = timeit(lambda: json.dumps(snap))
        c = snap["counters"]
        print(f"| {num_blocks:,} | {c['num_running']} | {c['num_waiting']} | {c['blocks_in_use']:,} | "
              f"{c['blocks_cached']:,} | {snap_us:.0f} | {warm_us:.0f} | {json_us:.0f} | {len(json.dumps(snap)):,} |")


if __name__ == "__main__":
    main()
