"""Offline throughput: all requests submitted at once, continuous batching does the rest."""

import time

from pagedllm.bench.workloads import BenchRequest
from pagedllm.sampling_params import SamplingParams


def _params(req: BenchRequest, temperature: float, seed: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=req.output_len, ignore_eos=True, seed=seed)


def run_llm(llm, requests: list[BenchRequest], temperature: float = 0.0) -> dict:
    """Submit every request at once and wait for all of them."""
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [_params(r, temperature) for r in requests]
    sync(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(llm)
    elapsed = time.perf_counter() - start
    return summarize(requests, outputs, elapsed)


def run_sequential(llm, requests: list[BenchRequest], temperature: float = 0.0) -> dict:
    """The same requests one after another: what serving without batching gives."""
    sync(llm)
    start = time.perf_counter()
    outputs = [llm.generate({"prompt_token_ids": r.prompt_token_ids}, _params(r, temperature))[0]
               for r in requests]
    sync(llm)
    return summarize(requests, outputs, time.perf_counter() - start)


def summarize(requests: list[BenchRequest], outputs, elapsed: float) -> dict:
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {
        "num_requests": len(requests),
        "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
    }


def sync(llm) -> None:
    import torch
    if torch.cuda.is_available() and llm.llm_engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()


def run_llm_roofline(llm, requests: list[BenchRequest], temperature: float, bandwidth: float,
                     peak_flops: float | None = None) -> dict:
    """run_llm, plus the roofline fields (decode steps counted by the engine core; the combined
    ones from its step shapes when the peak is given)."""
    from pagedllm.bench.roofline import StepCounter, roofline
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [_params(r, temperature) for r in requests]
    counter = StepCounter(llm)
    sync(llm)
    with counter.counting():
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        sync(llm)
        elapsed = time.perf_counter() - start
    summary = summarize(requests, outputs, elapsed)
    summary.update(roofline(llm, counter, [len(r.prompt_token_ids) for r in requests],
                            [len(o.outputs[0].token_ids) for o in outputs], elapsed, bandwidth, peak_flops))
    return summary
