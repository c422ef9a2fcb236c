"""Does the first timed run in a process pay one-time costs? `bench throughput` warms up with two
requests, then times one run of the workload. This builds the same engine, warms up the same way,
then times the nano workload several times in one process (prefix cache reset before each), and
counts what each run compiled or allocated: Triton kernels compiled (by name), torch.compile frames,
and device memory segments the caching allocator had to add.
A development tool for a GPU: `python benchmarks/first_run.py [--runs 3] [MODEL]`."""

import argparse
import time
from collections import Counter

import torch
import triton

from pagedllm import LLM
from pagedllm.bench.throughput import run_llm
from pagedllm.bench.workloads import nano_requests

compiled: Counter = Counter()


def _record_compile(*args, **kwargs) -> bool:
    """Triton's JIT cache hook: called before each compile; False lets the compile go ahead."""
    compiled[getattr(kwargs.get("fn"), "name", "?")] += 1
    return False


def _counts() -> dict:
    from torch._dynamo.utils import counters
    stats = torch.cuda.memory_stats()
    return {"dynamo_frames": sum(counters["stats"].values()), "segments": stats.get("segment.all.allocated", 0),
            "triton": sum(compiled.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    triton.knobs.runtime.jit_cache_hook = _record_compile
    started = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    print(f"engine built in {time.perf_counter() - started:.1f} s; Triton compiles so far {sum(compiled.values())}")
    reqs = nano_requests(llm.llm_engine.vocab_size, num=256, min_len=100, max_len=1024)
    run_llm(llm, reqs[:2], 0.6)   # bench throughput's warm-up
    llm.llm_engine.reset_prefix_cache()
    for run in range(args.runs):
        before, seen = _counts(), Counter(compiled)
        result = run_llm(llm, reqs, 0.6)
        llm.llm_engine.reset_prefix_cache()
        after = _counts()
        new = {k: v - seen[k] for k, v in compiled.items() if v > seen[k]}
        print(f"run {run + 1}: {result['elapsed_s']:.3f} s, {result['output_tokens_per_s']:,.0f} tok/s; "
              + ", ".join(f"{k} +{after[k] - before[k]}" for k in after) + (f"; compiled {new}" if new else ""),
              flush=True)


if __name__ == "__main__":
    main()
