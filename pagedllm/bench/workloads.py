"""Benchmark workloads: fixed seeds, random token ids, ignore_eos where the workload says so."""

import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(vocab_size) for _ in range(input_len)], output_len) for _ in range(num)]


def nano_requests(vocab_size: int, num: int = 256, min_len: int = 100, max_len: int = 1024,
                  seed: int = 0) -> list[BenchRequest]:
    """nano-vllm's published workload: input and output lengths each uniform in [100, 1024]."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        input_len, output_len = rng.randint(min_len, max_len), rng.randint(min_len, max_len)
        out.append(BenchRequest([rng.randrange(vocab_size) for _ in range(input_len)], output_len))
    return out


def prefix_requests(vocab_size: int, num_prefixes: int = 10, prefix_len: int = 768, unique_len: int = 256,
                    per_prefix: int = 10, output_len: int = 128, seed: int = 0) -> list[BenchRequest]:
    """Shared-prefix workload: each prompt = one of a few long system prompts + unique tokens
    (768 + 256 gives 75% cacheable prompt tokens)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    out = []
    for i in range(num_prefixes * per_prefix):
        unique = [rng.randrange(vocab_size) for _ in range(unique_len)]
        out.append(BenchRequest(prefixes[i % num_prefixes] + unique, output_len))
    return out
