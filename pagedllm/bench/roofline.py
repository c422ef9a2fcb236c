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

A large model at a large batch is compute-bound (an 8B decode step at batch 256 is ~4 TFLOP), and
the memory-only figure understates its limit. The combined roofline takes each engine step on its
own (the engine core logs their shapes, `record_steps`):

    ideal_time_combined = sum over steps of max(bytes / bandwidth, FLOPs / peak)

- bytes: all the weights, plus each scheduled request's KV read once (its context after the step);
- FLOPs: 2 x linear parameters per computed token, 2 x hidden x vocab per sampled row (the LM
  head), 4 x layers x heads x head_dim per attended (query, key) pair (QK^T and PV), divided among
  tensor-parallel ranks;
- peak: measured in the same run with a large square matmul in the model's dtype, 2 n^3 FLOPs per
  product over the median time.
"""

import statistics
import time
from contextlib import contextmanager

import torch

from pagedllm.config import ModelConfig


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


def measure_peak_flops(device: str | torch.device, dtype: torch.dtype, n: int | None = None,
                       repeats: int = 10) -> dict:
    """Multiply two n x n matrices on the device; return FLOP/s (2 n^3 per product)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):   # the first product warms up (library choice, clocks)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        if i:
            times.append(seconds)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_flops_per_s": 2 * n ** 3 / statistics.median(times), "peak_matmul_n": n,
            "peak_dtype": str(dtype).removeprefix("torch."), "peak_method": "n x n matmul, 2 n^3 / median time"}


def linear_params(model: ModelConfig) -> int:
    """Weights every computed token multiplies: attention projections and MLP, all layers."""
    c = model.hf_config
    attention = c.hidden_size * model.head_dim * (2 * c.num_attention_heads + 2 * model.num_kv_heads)
    return model.num_layers * (attention + 3 * c.hidden_size * c.intermediate_size)


def step_flops(step: tuple[int, int, int, int], model: ModelConfig) -> float:
    """One step's FLOPs on one rank; step = (tokens, sampled rows, attended pairs, context)."""
    tokens, sampled, pairs, _ = step
    c = model.hf_config
    flops = (2 * linear_params(model) * tokens + 2 * c.hidden_size * c.vocab_size * sampled
             + 4 * model.num_layers * c.num_attention_heads * model.head_dim * pairs)
    return flops / model.tensor_parallel_size


def combined_ideal_time(steps: list, weight_bytes: int, kv_bytes_per_token: int, model: ModelConfig,
                        bandwidth: float, peak_flops: float) -> float:
    """Sum over steps of max(bytes / bandwidth, FLOPs / peak)."""
    return sum(max((weight_bytes + kv_bytes_per_token * step[3]) / bandwidth,
                   step_flops(step, model) / peak_flops) for step in steps)


def kv_token_reads(prompt_lens: list[int], output_lens: list[int]) -> int:
    """Sum over generated tokens of their context length: token i of a request with prompt length P
    attends to P + i tokens."""
    return sum(p * n + n * (n - 1) // 2 for p, n in zip(prompt_lens, output_lens))


def ideal_time(decode_steps: int, weight_bytes: int, kv_bytes_per_token: int, prompt_lens: list[int],
               output_lens: list[int], bandwidth: float) -> float:
    reads = decode_steps * weight_bytes + kv_token_reads(prompt_lens, output_lens) * kv_bytes_per_token
    return reads / bandwidth


class StepCounter:
    """Engine steps, those that sampled any token, and every step's shape, while counting() is
    active (from the engine core's totals before and after, and its step log)."""

    def __init__(self, llm) -> None:
        self.engine = llm.llm_engine
        self.steps = 0          # all steps that ran something
        self.decode_steps = 0   # steps that produced at least one token
        self.shapes: list = []  # (tokens, sampled rows, attended pairs, context) per step

    @contextmanager
    def counting(self):
        before = self.engine.get_stats()
        self.engine.record_steps(True)
        try:
            yield self
        finally:
            self.shapes = self.engine.record_steps(False)
            after = self.engine.get_stats()
            self.steps = after["num_steps"] - before["num_steps"]
            self.decode_steps = after["num_decode_steps"] - before["num_decode_steps"]


def roofline(llm, counter: StepCounter, prompt_lens: list[int], output_lens: list[int], elapsed: float,
             bandwidth: float, peak_flops: float | None = None) -> dict:
    """The roofline fields of a result: ideal time, fraction, and what went into them; with the
    measured peak, the combined (compute-aware) ones too. With data-parallel engine cores the
    counted steps are all the busy cores' together, on as many devices, so the ideal divides by
    them (a request runs on one core: no more cores are busy than there are requests)."""
    wb = llm.llm_engine.model_info()["weight_bytes"]
    model = llm.llm_engine.config.model
    kvb = model.kv_bytes_per_token_per_rank
    cores = min(llm.llm_engine.config.data_parallel_size, len(prompt_lens))
    ideal = ideal_time(counter.decode_steps, wb, kvb, prompt_lens, output_lens, bandwidth) / cores
    result = {
        "tensor_parallel_size": model.tensor_parallel_size, "roofline_devices": cores,
        "weight_bytes": wb, "kv_bytes_per_token": kvb, "decode_steps": counter.decode_steps,
        "engine_steps": counter.steps, "kv_token_reads": kv_token_reads(prompt_lens, output_lens),
        "bandwidth_bytes_per_s": bandwidth, "ideal_time_s": ideal,
        "ideal_output_tokens_per_s": sum(output_lens) / ideal if ideal > 0 else None,
        "roofline_fraction": ideal / elapsed if elapsed > 0 else None,
    }
    if peak_flops is not None:
        combined = combined_ideal_time(counter.shapes, wb, kvb, model, bandwidth, peak_flops) / cores
        flops = sum(step_flops(step, model) for step in counter.shapes)
        result.update({"peak_flops_per_s": peak_flops, "flops": flops, "ideal_time_combined_s": combined,
                       "roofline_fraction_combined": combined / elapsed if elapsed > 0 else None})
    return result
