"""Prefix caching: 5 requests sharing one long system prompt; prints vllm:prefix_cache_queries and
vllm:prefix_cache_hits from /metrics before and after.

    python examples/prefix_caching.py [BASE_URL]   # default: $OPENAI_BASE_URL or http://localhost:8000/v1
"""

import os
import re
import sys
import urllib.request

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("PAGEDLLM_API_KEY", "unused"))
model = client.models.list().data[0].id
metrics_url = re.sub(r"/v1/?$", "", base_url) + "/metrics"

SYSTEM = ("You are a meticulous travel assistant. You answer questions about European capitals, their "
          "history, their museums, their food and how to get around by public transport. Keep every answer "
          "short, factual and friendly, and never invent facts you are not sure about. ") * 4
QUESTIONS = ["What is the capital of France?", "What should I eat in Rome?", "How do I get around Berlin?",
             "Which museum should I visit in Madrid?", "Is Vienna expensive?"]


def counters() -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url).read().decode()
    out = {}
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        out[name] = sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))
    return out


before = counters()
for question in QUESTIONS:
    r = client.chat.completions.create(model=model, max_tokens=16, temperature=0, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    cached = getattr(r.usage.prompt_tokens_details, "cached_tokens", 0) if r.usage.prompt_tokens_details else 0
    print(f"{question:40} prompt_tokens={r.usage.prompt_tokens} cached_tokens={cached}")
after = counters()
print()
for name in before:
    print(f"{name:36} before={before[name]:>8.0f}  after={after[name]:>8.0f}  delta={after[name] - before[name]:.0f}")
queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
print(f"hit rate over these 5 requests: {hits / queries:.1%}" if queries else "no queries recorded")
