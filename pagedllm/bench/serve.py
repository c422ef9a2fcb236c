"""`pagedllm bench serve`: a client for any OpenAI-compatible server, like `vllm bench serve`.

Sends /v1/completions requests (random token ids, the offline `nano` workload's own requests, or
text prompts) all at once or at a Poisson rate, with at most `max_concurrency` in flight, streamed
or not, and reports throughput and TTFT / TPOT / inter-chunk latency (mean, p50, p99). The client
must not be the bottleneck: it can run in several processes (`--client-processes`), each with its
own event loop, and the result records the client's CPU time. `--client openai` uses the official
AsyncOpenAI SDK instead of the lean aiohttp client. `--baseline-single` also runs one request
alone first, for the "N concurrent vs one alone" wall-time comparison.
"""

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field

from pagedllm.bench.workloads import BenchRequest, nano_requests

READY_TIMEOUT_S = 120   # for every client process to start and import; a failed one breaks the barrier

TEXT_PROMPTS = [
    "Explain how a paged KV cache works in an LLM inference server.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five facts about the planet Mars.",
    "What are the trade-offs between batching and latency in model serving?",
    "Describe the water cycle to a ten year old.",
]


@dataclass
class ClientConfig:
    """What one client process needs (plain: it is sent to client processes)."""
    base_url: str
    model: str | None
    api_key: str | None
    stream: bool
    temperature: float
    ignore_eos: bool
    timeout: float
    client: str = "aiohttp"             # or "openai"
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    seed: int = 0


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


def build_requests(args, num: int) -> list[BenchRequest | tuple[str, int]]:
    rng = random.Random(args.seed)
    if args.dataset == "nano":
        lo, hi = args.nano_len_range
        return nano_requests(args.vocab_size, num=num, min_len=lo, max_len=hi)
    if args.dataset == "random":
        return [BenchRequest([rng.randrange(100, args.vocab_size - 100) for _ in range(args.input_len)],
                             args.output_len) for _ in range(num)]
    return [BenchRequest(TEXT_PROMPTS[i % len(TEXT_PROMPTS)] + f" (request {i})", args.output_len) for i in range(num)]


def _body(cfg: ClientConfig, req: BenchRequest) -> dict:
    body = {"prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": cfg.temperature,
            "ignore_eos": cfg.ignore_eos, "stream": cfg.stream}
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.model is not None:
        body["model"] = cfg.model
    return body


def _on_chunk(result: RequestResult, chunk: dict, now: float, last: float) -> float:
    """Timing of one streamed chunk; returns the time of the last one that carried output."""
    if chunk.get("usage"):
        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
        result.output_tokens = chunk["usage"]["completion_tokens"]
    if not chunk.get("choices"):
        return last
    if result.ttft == 0.0:
        result.ttft = now - result.start
    else:
        result.itl.append(now - last)
    return now


async def _one_aiohttp(session, cfg: ClientConfig, req: BenchRequest) -> RequestResult:
    result = RequestResult(start=time.monotonic())
    last = result.start
    try:
        async with session.post(cfg.base_url.rstrip("/") + "/completions", json=_body(cfg, req)) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return result
            if not cfg.stream:
                usage = (await r.json())["usage"]
                result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            else:
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = str(chunk["error"])
                        return result
                    last = _on_chunk(result, chunk, time.monotonic(), last)
        result.latency = time.monotonic() - result.start
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - reported per request
        result.error = repr(exc)
    return result


async def _one_openai(client, cfg: ClientConfig, req: BenchRequest) -> RequestResult:
    result = RequestResult(start=time.monotonic())
    last = result.start
    body = _body(cfg, req)
    extra = {"ignore_eos": body.pop("ignore_eos")}
    try:
        response = await client.completions.create(**body, extra_body=extra)
        if not cfg.stream:
            result.prompt_tokens, result.output_tokens = response.usage.prompt_tokens, response.usage.completion_tokens
        else:
            async for chunk in response:
                last = _on_chunk(result, chunk.model_dump(), time.monotonic(), last)
        result.latency = time.monotonic() - result.start
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - reported per request
        result.error = repr(exc)
    return result


async def run_requests(cfg: ClientConfig, requests: list, ready=None) -> list[RequestResult]:
    """Send `requests` (all at once, or at cfg.request_rate); with `ready` (a barrier that every client
    process and the parent share), not before every process has its session open."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    rng = random.Random(cfg.seed)
    semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    if cfg.client == "openai":
        import openai
        session = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "unused", max_retries=0,
                                     timeout=cfg.timeout)   # its pool allows 1000 connections
        one = _one_openai
    else:
        import aiohttp
        session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=cfg.timeout),
                                        connector=aiohttp.TCPConnector(limit=0))
        one = _one_aiohttp

    async def limited(req):
        if semaphore is None:
            return await one(session, cfg, req)
        async with semaphore:
            return await one(session, cfg, req)

    try:
        if ready is not None:
            ready.wait(READY_TIMEOUT_S)
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if cfg.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        return list(await asyncio.gather(*tasks))
    finally:
        await session.close()


def _client_process(cfg: ClientConfig, requests: list, ready) -> tuple[list[RequestResult], float]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        results = asyncio.run(run_requests(cfg, requests, ready))
    except BaseException:
        if ready is not None:
            ready.abort()    # the other processes and the parent stop waiting for this one
        raise
    after = resource.getrusage(resource.RUSAGE_SELF)
    return results, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def benchmark(cfg: ClientConfig, requests: list, processes: int = 1) -> dict:
    """Send the requests from `processes` client processes (round-robin shares, all starting at
    once); returns the summary with the client's CPU time. The clock starts when every process has
    started, imported and opened its session. It used to start 3 s after the processes were spawned,
    and runs on the H200 whose requests had the same latencies (p99 end to end 4.9-5.1 s) took
    5.8-7.1 s in all: the slow ones had requests starting up to 2 s after the clock (a process still
    importing, presumably), which counted as the server's time."""
    if processes <= 1:
        start = time.monotonic()
        results, cpu = _client_process(cfg, requests, None)
        return summarize(results, time.monotonic() - start, cpu, 1)
    shares = [requests[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        ready = manager.Barrier(processes + 1)
        pending = pool.starmap_async(_client_process, [(cfg, share, ready) for share in shares])
        try:
            ready.wait(READY_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass    # a client failed before it was ready: get() raises its error
        start = time.monotonic()
        parts = pending.get()
    results = [r for part, _ in parts for r in part]
    end = max((r.start + r.latency for r in results if r.ok), default=start)
    return summarize(results, end - start, sum(cpu for _, cpu in parts), processes)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float, client_cpu_s: float | None = None,
              client_processes: int = 1) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft * 1000 for r in ok if r.ttft > 0]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1 and r.ttft > 0]
    itl = [x * 1000 for r in ok for x in r.itl]
    e2e = [r.latency * 1000 for r in ok]
    out = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": output_tokens,
           "request_throughput": len(ok) / duration if duration else 0.0,
           "output_throughput": output_tokens / duration if duration else 0.0,
           "client_processes": client_processes}
    if client_cpu_s is not None:
        out["client_cpu_s"] = client_cpu_s
        out["client_cpu_fraction"] = client_cpu_s / (duration * client_processes) if duration else 0.0
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
           "mean_itl_ms", "p50_itl_ms", "p99_itl_ms", "client_cpu_fraction"]


def served_model(base_url: str, api_key: str | None) -> str | None:
    """The first model the server lists (None if it lists none)."""
    import urllib.request
    request = urllib.request.Request(base_url.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["data"][0]["id"]
    except Exception:  # noqa: BLE001 - the server may not list models; send none
        return None


def client_config(args) -> ClientConfig:
    temperature = args.temperature if args.temperature is not None else (0.6 if args.dataset == "nano" else 0.0)
    return ClientConfig(args.base_url, args.model, args.api_key, args.stream, temperature, args.ignore_eos,
                        args.timeout, args.client, float(args.request_rate), args.max_concurrency, args.seed)


def cmd_serve(args: argparse.Namespace) -> None:
    from pagedllm.bench import results as res
    if args.model is None:
        args.model = served_model(args.base_url, args.api_key)
    cfg = client_config(args)
    requests = build_requests(args, args.num_prompts)
    asyncio.run(run_requests(cfg, requests[:1]))   # warm-up (not measured)
    rows = []
    if args.baseline_single:
        rows.append({"run": "1 request alone", **benchmark(cfg, requests[:1])})
    label = (f"{args.num_prompts} requests, rate {args.request_rate}, max concurrency {args.max_concurrency or 'inf'}"
             f", {'streaming' if args.stream else 'not streaming'}, {args.client} x {args.client_processes}")
    rows.append({"run": label, **benchmark(cfg, requests, args.client_processes)})
    result = {**res.environment(), "benchmark": "serve", "base_url": args.base_url, "model": args.model,
              "dataset": args.dataset, "input_len": args.input_len, "output_len": args.output_len,
              "num_prompts": args.num_prompts, "request_rate": args.request_rate, "stream": args.stream,
              "client": args.client, "max_concurrency": args.max_concurrency, "runs": rows}
    table = res.markdown_table(rows, COLUMNS)
    if args.baseline_single:
        ratio = rows[1]["duration_s"] / rows[0]["duration_s"]
        result["wall_time_ratio_vs_single"] = ratio
        table += (f"\n\n{args.num_prompts} requests took {rows[1]['duration_s']:.2f} s vs "
                  f"{rows[0]['duration_s']:.2f} s for one alone: {ratio:.2f}x the wall time")
    res.save(result, args.output, table)


def add_client_args(p: argparse.ArgumentParser) -> None:
    """The workload and client flags (shared with `bench serve-vs-offline`)."""
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "nano", "text"], default="random",
                   help="random: random token ids; nano: the offline nano workload's 256 requests; text: prompts")
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--nano-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson), or inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="default: 0.6 for nano, 0 otherwise")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--client", choices=["aiohttp", "openai"], default="aiohttp")
    p.add_argument("--client-processes", type=int, default=1, help="split the requests over this many processes")
    p.add_argument("--timeout", type=float, default=600.0)


def add_parser(bench) -> None:
    p = bench.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of the server's /v1/models")
    add_client_args(p)
    p.add_argument("--seed", type=int, default=0, help="of the random prompts and of the arrival times")
    p.add_argument("--baseline-single", action="store_true",
                   help="first run one request alone, and report the wall-time ratio")
    p.add_argument("--output", default=None, help="path stem for the .json and .md results")
    p.set_defaults(func=cmd_serve)
