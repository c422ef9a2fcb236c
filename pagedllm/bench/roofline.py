"""Memory-bandwidth roofline for decode-heavy runs (DESIGN.md, "Measuring").

    ideal_time = (decode_steps x weight_bytes
                  + sum over generated tokens of context_length x kv_bytes_per_token) / bandwidth

- bandwidth: measured in the same run by a large device-to-device copy, (bytes read + bytes
  written) / seconds, median of several repeats (CUDA events on GPU, perf_counter on CPU).
- weight_bytes: the model's parameter bytes, each storage counted once (a tied embedding is read
  once per step, as the LM head).
- decode_steps: engine steps of the run that sampled at least one token (the engine core counts
  them). Every such step must read all weights at least once.
- context length of a generated token = prompt_len + its index in the output (the first output
  token attends to the prompt, the second to the prompt + 1, ...).
- with tensor parallelism the GPUs read their shares side by side, so the roofline is one GPU's:
  rank 0's weight bytes and its KV bytes per token, at one GPU's measured bandwidth.
"""

import statistics
import time
from contextlib import contextmanager

import torch


def measure_bandwidth(device: str | torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Copy a large buffer to another on the same device; return bytes/s (read + written)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (allocation, first touch)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    moved = 2 * n * 4
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bandwidth_bytes_per_s": moved / seconds, "bandwidth_copy_bytes": n * 4,
            "bandwidth_repeats": repeats, "bandwidth_method": "device-to-device copy, (read + write) / median time"}


def kv_token_reads(prompt_lens: list[int], output_lens: list[int]) -> int:
    """Sum over generated tokens of their context length: token i of a request with prompt length P
    attends to P + i tokens."""
    return sum(p * n + n * (n - 1) // 2 for p, n in zip(prompt_lens, output_lens))


def ideal_time(decode_steps: int, weight_bytes: int, kv_bytes_per_token: int, prompt_lens: list[int],
               output_lens: list[int], bandwidth: float) -> float:
    reads = decode_steps * weight_bytes + kv_token_reads(prompt_lens, output_lens) * kv_bytes_per_token
    return reads / bandwidth


class StepCounter:
    """Engine steps, and those that sampled any token, while counting() is active (read from the
    engine core's totals before and after)."""

    def __init__(self, llm) -> None:
        self.engine = llm.llm_engine
        self.steps = 0          # all steps that ran something
        self.decode_steps = 0   # steps that produced at least one token

    @contextmanager
    def counting(self):
        before = self.engine.get_stats()
        try:
            yield self
        finally:
            after = self.engine.get_stats()
            self.steps = after["num_steps"] - before["num_steps"]
            self.decode_steps = after["num_decode_steps"] - before["num_decode_steps"]


def roofline(llm, counter: StepCounter, prompt_lens: list[int], output_lens: list[int], elapsed: float,
             bandwidth: float) -> dict:
    """The roofline fields of a result: ideal time, fraction, and what went into them."""
    wb = llm.llm_engine.model_info()["weight_bytes"]
    model = llm.llm_engine.config.model
    kvb = model.kv_bytes_per_token_per_rank
    ideal = ideal_time(counter.decode_steps, wb, kvb, prompt_lens, output_lens, bandwidth)
    return {
        "tensor_parallel_size": model.tensor_parallel_size,
        "weight_bytes": wb, "kv_bytes_per_token": kvb, "decode_steps": counter.decode_steps,
        "engine_steps": counter.steps, "kv_token_reads": kv_token_reads(prompt_lens, output_lens),
        "bandwidth_bytes_per_s": bandwidth, "ideal_time_s": ideal,
        "ideal_output_tokens_per_s": sum(output_lens) / ideal if ideal > 0 else None,
        "roofline_fraction": ideal / elapsed if elapsed > 0 else None,
    }
