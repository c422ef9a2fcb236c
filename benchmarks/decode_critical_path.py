"""What each kernel of a decode step adds to the step's time. Under programmatic dependent
launch a kernel starts before the one before it ends, so kernel durations overlap and their sum
overstates the step; what a kernel costs the step is how much later it ends than its predecessor.
From a torch.profiler trace (kernels of the CUDA graphs included) of --batch requests' decode
steps, per kernel (name and grid): launches a step, mean duration, mean overlap with the predecessor
and mean end-to-end increment, and the increments' sum a step. With more than one request the
profiled run finds its prompts in the prefix cache, so its prefill is one short step. A development
tool for a GPU: `python benchmarks/decode_critical_path.py [MODEL ...] [--batch N ...]` (default
Qwen/Qwen3-8B at batch 1, dummy weights, bf16).
"""

import argparse

import gc
import json
import random
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams

PROMPT_LEN = 512
STEPS = 40


def kernels(trace_path: str) -> list[dict]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def label(event: dict) -> str:
    grid = tuple(event.get("args", {}).get("grid", ()))
    return f"{event['name'][:48]} {grid}"


def report(events: list[dict], steps: int) -> None:
    stats = defaultdict(lambda: [0, 0.0, 0.0, 0.0])     # count, duration, overlap, increment
    for before, event in zip(events, events[1:]):
        end_before, end = before["ts"] + before["dur"], event["ts"] + event["dur"]
        s = stats[label(event)]
        s[0] += 1
        s[1] += event["dur"]
        s[2] += end_before - event["ts"]
        s[3] += end - end_before
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    print(f"{len(events)} kernels over {span / 1000:.3f} ms, {steps} decode steps: {span / steps:.1f} us a step")
    print(f"{'kernel (grid)':64s} {'a step':>7s} {'dur us':>7s} {'overlap':>8s} {'adds us':>8s} {'us a step':>10s}")
    for name, (count, dur, overlap, inc) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        if count >= steps:
            print(f"{name:64s} {count / steps:7.1f} {dur / count:7.2f} {overlap / count:8.2f} {inc / count:8.2f} "
                  f"{inc / steps:10.1f}")
    rare = sum(s[3] for s in stats.values() if s[0] < steps)
    print(f"{'kernels launched less than once a step (prefill)':96s} {rare / steps:10.1f}")


def profile_steps(llm: LLM, batch: int) -> list[dict]:
    """Kernels of `batch` requests, each a distinct 512-token prompt (no shared prefix, so no cascade),
    then STEPS decode steps (after a warm-up run)."""
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 20000) for _ in range(PROMPT_LEN)]} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS + 1, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return kernels(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["Qwen/Qwen3-8B"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="decoding requests (one run each)")
    args = parser.parse_args()
    for model in args.models:
        for batch in args.batch:
            with LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=batch,
                     max_num_batched_tokens=max(1024, min(8192, batch * PROMPT_LEN))) as llm:
                events = profile_steps(llm, batch)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"\n=== {model}, batch {batch}, prompt {PROMPT_LEN}")
            report(events, STEPS)


if __name__ == "__main__":
    main()
