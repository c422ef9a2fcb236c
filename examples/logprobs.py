"""Top-5 next tokens with their probabilities, from a running `pagedllm serve` (or any OpenAI-compatible server).

    python examples/logprobs.py [BASE_URL]      # default: $OPENAI_BASE_URL or http://localhost:8000/v1
"""

import math
import os
import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("PAGEDLLM_API_KEY", "unused"))
model = client.models.list().data[0].id

prompt = "The capital of France is"
response = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": f"Complete the sentence: {prompt}"}],
    max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
print(f"model: {model}\nanswer: {response.choices[0].message.content!r}\n")
for position, token in enumerate(response.choices[0].logprobs.content):
    print(f"token {position}: {token.token!r} (p={math.exp(token.logprob):.3f})")
    for top in token.top_logprobs:
        print(f"    {top.token!r:>16}  p={math.exp(top.logprob):.3f}  logprob={top.logprob:.3f}")

# The completions endpoint, the same prompt as raw text: the top 5 candidates for the next token.
completion = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=5)
print(f"\nnext token after {prompt!r}:")
for token, logprob in sorted(completion.choices[0].logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1]):
    print(f"    {token!r:>16}  p={math.exp(logprob):.3f}")
