"""`pagedllm bench latency`: one request at a time, a 512-token prompt, 256 new tokens (greedy, ignore_eos).

- TTFT: from submitting the request to the end of the first engine step that produced its first token.
- TPOT (mean time per output token): (total - TTFT) / (n - 1), n = output tokens.
Each repeat uses a fresh random prompt and the prefix cache is reset, so nothing is reused; the
figures are medians over the repeats (after one untimed warm-up).
"""

import random
import statistics
import time

from pagedllm.bench.roofline import StepCounter, roofline
from pagedllm.bench.throughput import sync
from pagedllm.sampling_params import SamplingParams


def one_request(llm, prompt: list[int], output_len: int) -> dict:
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind="delta")
    request_id = f"latency-{engine.new_request_id()}"
    engine.reset_prefix_cache()
    sync(llm)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first = None
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = sum(len(c.token_ids) for c in out.outputs)
            if new and first is None:
                first = time.perf_counter()
            n += new
    sync(llm)
    total = time.perf_counter() - start
    ttft = (first or time.perf_counter()) - start
    return {"ttft_s": ttft, "total_s": total, "output_tokens": n,
            "tpot_s": (total - ttft) / (n - 1) if n > 1 else None}


def run_latency(llm, prompt_len: int = 512, output_len: int = 256, repeats: int = 3, seed: int = 0,
                bandwidth: float | None = None, peak_flops: float | None = None) -> dict:
    vocab = llm.llm_engine.vocab_size
    rng = random.Random(seed)
    one_request(llm, [rng.randrange(vocab) for _ in range(prompt_len)], min(output_len, 8))  # warm-up
    runs = []
    counter = StepCounter(llm)
    for _ in range(repeats):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        counter.steps = counter.decode_steps = 0
        with counter.counting():
            runs.append(one_request(llm, prompt, output_len))
    ttft = statistics.median(r["ttft_s"] for r in runs)
    tpot = statistics.median(r["tpot_s"] for r in runs if r["tpot_s"] is not None) \
        if any(r["tpot_s"] is not None for r in runs) else None
    total = statistics.median(r["total_s"] for r in runs)
    n = runs[-1]["output_tokens"]
    result = {"prompt_len": prompt_len, "output_len": output_len, "repeats": repeats,
              "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3 if tpot is not None else None,
              "total_s": total, "output_tokens": n, "output_tokens_per_s": n / total,
              "decode_tokens_per_s": 1 / tpot if tpot else None, "runs": runs}
    if bandwidth is not None:
        # the last repeat's step count; ideal vs the median total time
        result.update(roofline(llm, counter, [prompt_len], [n], total, bandwidth, peak_flops))
        # weights-only limit per output token, the figure the issue quotes (0.4 ms on an H100)
        result["ideal_tpot_ms"] = (result["weight_bytes"] + (prompt_len + n / 2) * result["kv_bytes_per_token"]) \
            / bandwidth * 1e3
    return result
