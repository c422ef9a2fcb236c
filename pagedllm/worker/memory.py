"""KV pool sizing and the KV byte accounting shown to users."""

import logging

import torch

from pagedllm.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
CPU_KV_BUDGET = 2 * GiB     # the CPU pool's bytes per rank unless kv_cache_memory says otherwise


def format_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def block_bytes(model: ModelConfig, cache: CacheConfig) -> int:
    """One block of one rank's pool."""
    return model.kv_bytes_per_token_per_rank * cache.block_size


def num_blocks_for_budget(model: ModelConfig, cache: CacheConfig, budget_bytes: int) -> int:
    return int(budget_bytes // block_bytes(model, cache))


def gpu_kv_budget(total: int, utilization: float, weights: int, activation_peak: int) -> int:
    """Bytes left for the KV pool: the utilisation share of the card minus weights and the profiled
    activation peak of a max-size step."""
    return int(total * utilization) - weights - activation_peak


def cpu_pool_budget(cache: CacheConfig) -> int:
    return CPU_KV_BUDGET if cache.kv_cache_memory is None else cache.kv_cache_memory


def gpu_pool_budget(requested: int | None, by_utilization: int, available: int) -> int:
    """A GPU pool's bytes: kv_cache_memory if given (as vLLM's kv_cache_memory_bytes, it replaces the
    utilisation share; an error if the card has not that much free), else the utilisation share,
    never more than is actually free (`available`: free memory less the activation peak and slack)."""
    if requested is None:
        return min(by_utilization, available)
    if requested > available:
        raise ValueError(f"kv_cache_memory ({format_bytes(requested)}) is more than the GPU has free for the KV "
                         f"cache after weights and activations ({format_bytes(max(available, 0))})")
    return requested


def log_capacity(model: ModelConfig, cache: CacheConfig, num_blocks: int) -> dict:
    per_token = model.kv_bytes_per_token_per_rank
    tokens = num_blocks * cache.block_size
    per_request_blocks = -(-model.max_model_len // cache.block_size)
    info = {
        "kv_bytes_per_token": per_token,
        "num_blocks": num_blocks,
        "block_size": cache.block_size,
        "pool_bytes": num_blocks * block_bytes(model, cache),
        "token_capacity": tokens,
        "max_concurrency_at_max_model_len": num_blocks / per_request_blocks,
    }
    where = f" on each of {model.tensor_parallel_size} ranks" if model.tensor_parallel_size > 1 else ""
    logger.info("KV cache%s: %s per token, %d blocks of %d tokens (%s), %d tokens, "
                "max concurrency %.2fx at max_model_len %d", where, format_bytes(per_token), num_blocks,
                cache.block_size, format_bytes(info["pool_bytes"]), tokens,
                info["max_concurrency_at_max_model_len"], model.max_model_len)
    return info


def kv_table(model: ModelConfig, num_seqs: int) -> str:
    """Markdown table of KV memory per context length, for one and for num_seqs requests."""
    per_token = model.kv_bytes_per_token
    lengths, n = [], 64
    while n < model.max_model_len:
        lengths.append(n)
        n *= 4
    lengths.append(model.max_model_len)
    rows = [f"| tokens | KV memory (1 request) | KV memory ({num_seqs} requests) |", "|---:|---:|---:|"]
    rows += [f"| {t:,} | {format_bytes(t * per_token)} | {format_bytes(t * per_token * num_seqs)} |"
             for t in lengths]
    return "\n".join(rows)


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes, each distinct storage once (a tied embedding counts once: it is read once
    per step, as the LM head)."""
    seen, total = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel())
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total
