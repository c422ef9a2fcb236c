"""Where the host's time goes in structured-output runs: the nano prompts under bench structured's
JSON schema, then unconstrained with the same lengths, offline with the engine core in this
process, each engine phase timed by a wrapper (wall ms per engine step). A development tool:
`python benchmarks/structured_profile.py --tokenizer DIR [MODEL]` (default Qwen/Qwen3-0.6B, dummy
weights, bfloat16)."""

import argparse
import functools
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.structured import Record
from pagedllm.bench.workloads import nano_requests
from pagedllm.engine.core import EngineCore
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.structured_output import StructuredOutputManager
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.worker.model_runner import ModelRunner, PendingStep

TIMED = {
    "schedule": (Scheduler, "schedule"),
    "execute_model (prepare + issue forward)": (ModelRunner, "execute_model"),
    "wait for the device (result)": (PendingStep, "result"),
    "update_from_output": (Scheduler, "update_from_output"),
    "grammar accept": (StructuredOutputManager, "accept"),
    "grammar bitmask": (StructuredOutputManager, "bitmask"),
    "issue sampling (deferred)": (PendingStep, "sample"),
    "engine step (all)": (EngineCore, "step"),
    "front end step (all, with output processing)": (LLMEngine, "step"),
}
totals: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    return wrapper


def run(llm: LLM, label: str, prompts: list, params) -> list:
    engine = llm.llm_engine
    engine.reset_prefix_cache()
    steps = engine.get_stats()["num_steps"]
    totals.clear()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    steps = engine.get_stats()["num_steps"] - steps
    print(f"\n=== {label}: {wall:.3f} s, {steps} steps, {1e3 * wall / steps:.3f} ms/step")
    for name in TIMED:
        print(f"  {name:48s} {1e3 * totals[name] / steps:7.3f} ms/step")
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--torch-profile", action="store_true",
                        help="also one constrained run under torch.profiler: the host's top ops and CUDA calls")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, tokenizer=args.tokenizer)
    for name, (owner, attr) in TIMED.items():
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in nano_requests(
        llm.llm_engine.vocab_size, num=args.num_prompts, min_len=min(100, args.max_len), max_len=args.max_len)]
    schema = StructuredOutputsParams(json=Record.model_json_schema())
    constrained = SamplingParams(temperature=0.6, max_tokens=256, structured_outputs=schema)
    llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=8, structured_outputs=schema), use_tqdm=False)
    llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for repeat in range(args.repeats):
        outs = run(llm, f"constrained, repeat {repeat + 1}", prompts, constrained)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        same = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in lengths]
        run(llm, f"unconstrained, same lengths, repeat {repeat + 1}", prompts, same)
    if args.torch_profile:
        for label, params in (("constrained", constrained), ("unconstrained", same)):
            llm.llm_engine.reset_prefix_cache()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                llm.generate(prompts, params, use_tqdm=False)
            print(f"\n=== torch.profiler, {label} run: by host self time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
