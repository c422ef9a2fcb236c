"""Where the nano workload's time goes on a GPU, against its roofline: each engine step's wall time
next to its ideal time (max of bytes / bandwidth and FLOPs / peak, as `bench throughput` counts
them), summed by batch size; then the GPU's kernel time by kind over one whole run (torch.profiler)
against the wall time. A development tool: `python benchmarks/nano_profile.py [MODEL]` (default
Qwen/Qwen3-0.6B, dummy weights, bfloat16, 256 requests)."""

import argparse
import functools
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.roofline import measure_bandwidth, measure_peak_flops, step_flops
from pagedllm.bench.throughput import sync
from pagedllm.bench.workloads import nano_requests
from pagedllm.engine.core import EngineCore

BUCKETS = [(1, 16, "1-16"), (17, 64, "17-64"), (65, 128, "65-128"),
           (129, 192, "129-192"), (193, 256, "193-256")]
KINDS = [("attention, decode", ("decode_split", "decode_reduce", "shared_prefix")),
         ("attention, prefill", ("paged_attention", "prefill")),
         ("GEMM, cuBLAS", ("nvjet", "gemm", "cublas", "splitkreduce", "cutlass")),
         ("GEMM, skinny", ("skinny",)), ("RMSNorm", ("rms", "rsqrt")), ("q/k norm, rotary, KV store", ("qk_rope",)),
         ("SiLU and mul", ("silu",)), ("sampling", ("sample", "argmax", "reduce_kernel")),
         ("copies", ("memcpy", "memset", "copy", "index", "gather", "scatter"))]
step_ends: list[float] = []


def _timed_step(step):
    @functools.wraps(step)
    def wrapper(self):
        out = step(self)
        step_ends.append(time.perf_counter())
        return out
    return wrapper


def _kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def run(llm: LLM, prompts: list, params: list) -> float:
    """One run from an empty prefix cache, as the first run of `bench throughput` sees it."""
    llm.llm_engine.reset_prefix_cache()
    sync(llm)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sync(llm)
    return time.perf_counter() - start


def by_batch(llm: LLM, prompts: list, params: list, bandwidth: float, peak: float) -> None:
    """A step's device time is the interval between the ends of the engine calls that complete it
    and the next one (the loop issues step k, then waits for step k - 1)."""
    engine = llm.llm_engine
    model = engine.config.model
    weights, kv = engine.model_info()["weight_bytes"], model.kv_bytes_per_token_per_rank
    engine.record_steps(True)
    step_ends.clear()
    wall = run(llm, prompts, params)
    shapes = engine.record_steps(False)
    ends = step_ends[1:len(shapes) + 1]
    assert len(ends) == len(shapes), (len(ends), len(shapes))
    rows = defaultdict(lambda: [0, 0.0, 0.0])
    for shape, begin, end in zip(shapes, [step_ends[0]] + ends, ends):
        ideal = max((weights + kv * shape[3]) / bandwidth, step_flops(shape, model) / peak)
        label = "with prefill" if shape[0] > shape[1] else next(b[2] for b in BUCKETS if b[0] <= shape[1] <= b[1])
        row = rows[label]
        row[0] += 1
        row[1] += end - begin
        row[2] += ideal
    print(f"\n=== {len(shapes)} steps, {wall:.3f} s wall; ideal {sum(r[2] for r in rows.values()):.3f} s")
    print(" " * 2 + "sampled rows  steps   wall s  ideal s fraction  ms/step  over ms")
    for label in ["with prefill"] + [b[2] for b in BUCKETS]:
        if label in rows:
            n, actual, ideal = rows[label]
            print(f"{label:>14} {n:6d} {actual:8.3f} {ideal:8.3f} {ideal / actual:8.3f} {1e3 * actual / n:8.3f} "
                  f"{1e3 * (actual - ideal) / n:8.3f}")


def kernels(llm: LLM, prompts: list, params: list) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = run(llm, prompts, params)
    totals = defaultdict(float)
    for event in prof.key_averages():
        totals[_kind(event.key)] += event.self_device_time_total / 1e6
    busy = sum(totals.values())
    print(f"\n=== under the profiler: {wall:.3f} s wall, GPU kernels {busy:.3f} s ({busy / wall:.0%} busy)")
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32s} {seconds:8.3f} s  {seconds / wall:6.1%} of wall")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1024, help="nano's largest prompt and output length")
    parser.add_argument("--runs", type=int, default=2, help="timed runs, each printed")
    parser.add_argument("--prefill-only", action="store_true",
                        help="one output token a request: the run is nano's prefill steps alone")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="a last run under torch.profiler, its kernel times by kind")
    args = parser.parse_args()
    EngineCore.step = _timed_step(EngineCore.step)
    # as `bench throughput` does: before the engine is built (after it, with the KV pool taking the
    # memory, the copy measured 2.4-3.6 TB/s in some runs instead of ~4.1)
    bandwidth = measure_bandwidth("cuda")["bandwidth_bytes_per_s"]
    peak = measure_peak_flops("cuda", torch.bfloat16)["peak_flops_per_s"]
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    requests = nano_requests(llm.llm_engine.vocab_size, args.num_prompts, max_len=args.max_len)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.6, max_tokens=1 if args.prefill_only else r.output_len, ignore_eos=True)
              for r in requests]
    print(f"bandwidth {bandwidth / 1e12:.2f} TB/s, peak {peak / 1e12:.0f} TFLOP/s")
    run(llm, prompts[:32], params[:32])    # warm-up
    for _ in range(args.runs):
        by_batch(llm, prompts, params, bandwidth, peak)
    if args.kernels:
        kernels(llm, prompts, params)


if __name__ == "__main__":
    main()
