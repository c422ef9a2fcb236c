"""Where an engine step's time goes on a GPU: wall time per step against the GPU's kernel time per
step (torch.profiler), the top kernels, and the host's hottest functions (cProfile), for decode at
batch 1 and at a large batch. A development tool: `python benchmarks/step_profile.py [MODEL]`
(default Qwen/Qwen3-0.6B, dummy weights, bfloat16)."""

import cProfile
import io
import pstats
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams


def requests(batch: int, prompt_len: int, vocab: int) -> list[dict]:
    rng = random.Random(batch)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]} for _ in range(batch)]


def run(llm: LLM, batch: int, prompt_len: int, steps: int) -> None:
    vocab = llm.llm_engine.vocab_size
    params = SamplingParams(temperature=0.6, max_tokens=steps, ignore_eos=True)
    llm.generate(requests(batch, prompt_len, vocab), params, use_tqdm=False)      # warm-up
    prompts = requests(batch, prompt_len, vocab)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(requests(batch, prompt_len, vocab), params, use_tqdm=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e6
    print(f"\n=== batch {batch}, prompt {prompt_len}, {steps} steps: wall {wall:.3f} s = {1000 * wall / steps:.3f} ms/step; "
          f"GPU kernels {gpu:.3f} s = {1000 * gpu / steps:.3f} ms/step ({gpu / wall:.0%} busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(requests(batch, prompt_len, vocab), params, use_tqdm=False)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[-6000:])


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen3-0.6B"
    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    run(llm, 1, 512, 256)
    run(llm, 128, 512, 256)


if __name__ == "__main__":
    main()
