"""`pagedllm bench serve`: an async client for any OpenAI-compatible server, like `vllm bench serve`.

Sends requests (random token ids through /v1/completions, or text prompts) either at a fixed
request rate (Poisson arrivals; inf = all at once) or with at most `max_concurrency` in flight,
streams every response, and reports request throughput, output tokens/s, and TTFT / TPOT / ITL
mean, p50 and p99. `--baseline-single` also runs one request alone first, for the
"N concurrent vs one alone" wall-time comparison.
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

TEXT_PROMPTS = [
    "Explain how a paged KV cache works in an LLM inference server.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five facts about the planet Mars.",
    "What are the trade-offs between batching and latency in model serving?",
    "Describe the water cycle to a ten year old.",
]


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0


def build_prompts(args, num: int) -> list:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return [[rng.randrange(100, args.vocab_size - 100) for _ in range(args.input_len)] for _ in range(num)]
    return [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] + f" (request {i})" for i in range(num)]


async def _one(client, args, prompt) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": args.temperature,
            "ignore_eos": args.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    if args.model is None:
        body.pop("model")
    result = RequestResult(start=time.perf_counter())
    last = result.start
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + "/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - result.start
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - reported per request
        result.error = repr(exc)
    return result


async def run_requests(args, prompts: list, request_rate: float, max_concurrency: int | None) -> tuple[list, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(len(prompts), 1) + 4)
    rng = random.Random(args.seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as client:
        async def limited(prompt):
            if semaphore is None:
                return await _one(client, args, prompt)
            async with semaphore:
                return await _one(client, args, prompt)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft * 1000 for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    itl = [x * 1000 for r in ok for x in r.itl]
    e2e = [r.latency * 1000 for r in ok]
    out = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": output_tokens,
           "request_throughput": len(ok) / duration if duration else 0.0,
           "output_throughput": output_tokens / duration if duration else 0.0}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        out[f"mean_{name}"] = statistics.fmean(values) if values else 0.0
        out[f"p50_{name}"] = _pct(values, 50)
        out[f"p99_{name}"] = _pct(values, 99)
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["first_error"] = errors[0]
    return out


COLUMNS = ["run", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
           "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "p50_itl_ms", "p99_itl_ms"]


def cmd_serve(args: argparse.Namespace) -> None:
    import logging
    from pagedllm.bench import results as res
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.model is None:
        try:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            models = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers, timeout=30).json()
            args.model = models["data"][0]["id"]
        except Exception:  # noqa: BLE001 - the server may not list models; send none
            args.model = None
    rate = float(args.request_rate)
    prompts = build_prompts(args, args.num_prompts)
    # warm-up (not measured)
    asyncio.run(run_requests(args, prompts[:1], float("inf"), None))
    rows = []
    if args.baseline_single:
        single, duration = asyncio.run(run_requests(args, prompts[:1], float("inf"), None))
        rows.append({"run": "1 request alone", **summarize(single, duration)})
    results, duration = asyncio.run(run_requests(args, prompts, rate, args.max_concurrency))
    label = f"{args.num_prompts} requests, rate {args.request_rate}, max concurrency {args.max_concurrency or 'inf'}"
    rows.append({"run": label, **summarize(results, duration)})
    result = {**res.environment(), "benchmark": "serve", "base_url": args.base_url, "model": args.model,
              "dataset": args.dataset, "input_len": args.input_len, "output_len": args.output_len,
              "num_prompts": args.num_prompts, "request_rate": args.request_rate,
              "max_concurrency": args.max_concurrency, "runs": rows}
    table = res.markdown_table(rows, COLUMNS)
    if args.baseline_single:
        ratio = rows[1]["duration_s"] / rows[0]["duration_s"]
        result["wall_time_ratio_vs_single"] = ratio
        table += (f"\n\n{args.num_prompts} requests took {rows[1]['duration_s']:.2f} s vs "
                  f"{rows[0]['duration_s']:.2f} s for one alone: {ratio:.2f}x the wall time")
    res.save(result, args.output, table)


def add_parser(bench) -> None:
    p = bench.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of the server's /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "text"], default="random",
                   help="random: random token ids through the completions token-id prompt")
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson), or inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--baseline-single", action="store_true",
                   help="first run one request alone, and report the wall-time ratio")
    p.add_argument("--output", default=None, help="path stem for the .json and .md results")
    p.set_defaults(func=cmd_serve)
