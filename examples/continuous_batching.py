"""Continuous batching: 5 prompts sent concurrently vs. one after another, against a running server.

    python examples/continuous_batching.py [BASE_URL]   # default: $OPENAI_BASE_URL or http://localhost:8000/v1
"""

import asyncio
import os
import sys
import time

from openai import AsyncOpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1")
PROMPTS = ["Write a haiku about the sea.", "Name three primary colors.", "What is 12 times 12?",
           "Give me a synonym for 'happy'.", "Describe a cat in one sentence."]
MAX_TOKENS = 64


async def ask(client, model, prompt):
    start = time.perf_counter()
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True})
    return r, time.perf_counter() - start


async def main():
    client = AsyncOpenAI(base_url=base_url, api_key=os.environ.get("PAGEDLLM_API_KEY", "unused"))
    model = (await client.models.list()).data[0].id
    await ask(client, model, "warm up")

    start = time.perf_counter()
    sequential = [await ask(client, model, p) for p in PROMPTS]
    sequential_s = time.perf_counter() - start

    start = time.perf_counter()
    concurrent = await asyncio.gather(*(ask(client, model, p) for p in PROMPTS))
    concurrent_s = time.perf_counter() - start

    print(f"{'prompt':34} {'prompt_tok':>10} {'output_tok':>10} {'seq s':>7} {'conc s':>7}")
    for p, (r1, t1), (r2, t2) in zip(PROMPTS, sequential, concurrent):
        print(f"{p[:34]:34} {r2.usage.prompt_tokens:>10} {r2.usage.completion_tokens:>10} {t1:>7.2f} {t2:>7.2f}")
    print(f"\none after another: {sequential_s:.2f} s")
    print(f"concurrently:      {concurrent_s:.2f} s  ({sequential_s / concurrent_s:.2f}x faster)")
    await client.close()


asyncio.run(main())
