"""`pagedllm bench stress`: load a running OpenAI-compatible server until something breaks, and check
that nothing did (issue 5).

N concurrent requests mixing streaming and non-streaming, /v1/completions and /v1/chat/completions,
n=1 and n=2, greedy and sampled, with a fraction of the streaming clients walking away mid-stream.
Checks: every request not abandoned completes with a well-formed response; every greedy request
returns exactly the text the same request returns alone (batching and preemption change nothing);
afterwards /metrics settles at 0 running, 0 waiting and 0 KV usage (no leaked blocks).

Start the server with a deliberately small KV pool to force preemption, for example
    pagedllm serve --max-model-len 256 --kv-cache-memory 12582912 --max-num-seqs 8
    pagedllm bench stress --num-requests 200
The load test in tests/test_reliability.py runs the same code at CI size.
"""

import argparse
import asyncio
import json
import random
import re
import time

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The three primary colors are"]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def metric_samples(url: str, headers: dict | None = None) -> list[tuple[str, str, float]]:
    """Every vllm:* sample of /metrics as (name, labels as written, value)."""
    out = []
    for line in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines():
        m = re.match(r'^(vllm:[a-z0-9_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return out


def read_metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """vllm:* samples of /metrics; `finished_reason` labels folded into the key, other labels (the
    `engine` of each data-parallel core) added up."""
    out: dict[str, float] = {}
    for name, labels, value in metric_samples(url, headers):
        reason = re.search(r'finished_reason="(\w+)"', labels)
        key = name + (f"[{reason.group(1)}]" if reason else "")
        out[key] = out.get(key, 0.0) + value
    return out


def wait_settled(url: str, timeout: float = 15.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks (or the timeout); the last sample."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        idle = (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"])
        if idle == (0, 0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def request_body(model: str, kind: str, prompt: int, greedy: bool, n: int, stream: bool, rng: random.Random,
                 greedy_tokens: int, sampled_tokens: tuple[int, int]) -> dict:
    if greedy:
        body = {"max_tokens": greedy_tokens, "temperature": 0}
    else:
        body = {"max_tokens": rng.randint(*sampled_tokens), "temperature": 0.8, "seed": rng.randint(0, 1000),
                "ignore_eos": True}
    body.update(model=model, n=n, stream=stream)
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": PROMPTS[prompt]}]
    else:
        body["prompt"] = PROMPTS[prompt]
    return body


class Malformed(AssertionError):
    """The server answered, but not in the OpenAI shape."""


def _check(ok: bool, what) -> None:
    if not ok:
        raise Malformed(str(what)[:500])


def _texts_of(kind: str, obj: dict, n: int, model: str) -> list[str]:
    _check(obj.get("object") == ("chat.completion" if kind == "chat" else "text_completion"), obj)
    _check(obj.get("id") and obj.get("model") == model and len(obj.get("choices", ())) == n, obj)
    texts = [""] * n
    for choice in obj["choices"]:
        _check(choice["finish_reason"] in ("stop", "length"), choice)
        texts[choice["index"]] = choice["message"]["content"] if kind == "chat" else choice["text"]
    usage = obj["usage"]
    _check(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0, usage)
    return texts


async def one_request(client, kind: str, body: dict, model: str, disconnect_after: int | None) -> list[str] | None:
    """One request; the texts of its choices, or None if this client walked away mid-stream. Raises
    Malformed for a response that is not well-formed."""
    path = CHAT if kind == "chat" else COMPLETIONS
    n = body["n"]
    if not body["stream"]:
        r = await client.post(path, json=body)
        _check(r.status_code == 200, (r.status_code, r.text[:300]))
        return _texts_of(kind, r.json(), n, model)
    texts, finished, chunks = [""] * n, [None] * n, 0
    async with client.stream("POST", path, json=body) as r:
        _check(r.status_code == 200, (r.status_code, (await r.aread())[:300]))
        last = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            _check("error" not in chunk, chunk)
            _check(chunk["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion"), chunk)
            for choice in chunk["choices"]:
                i = choice["index"]
                _check(finished[i] is None, f"choice {i} got a chunk after its finish_reason")
                texts[i] += (choice["delta"].get("content") or "") if kind == "chat" else choice["text"]
                finished[i] = choice["finish_reason"]
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return None                 # leaving the `async with` closes the connection mid-stream
        _check(last == "data: [DONE]", f"stream ended with {last!r}")
    _check(all(f in ("stop", "length") for f in finished), finished)
    return texts


async def run_stress(url: str, model: str, num_requests: int = 200, disconnect_fraction: float = 0.2,
                     greedy_tokens: int = 12, sampled_tokens: tuple[int, int] = (16, 48), seed: int = 0,
                     api_key: str | None = None) -> dict:
    """Run the workload against `url` (no /v1); return a summary with every failure listed."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=num_requests + 8, max_keepalive_connections=num_requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        solo = {}
        for kind in ("completions", "chat"):
            for p in range(len(PROMPTS)):
                body = request_body(model, kind, p, True, 1, False, rng, greedy_tokens, sampled_tokens)
                solo[kind, p] = (await one_request(client, kind, body, model, None))[0]
        plan = []
        for i in range(num_requests):
            kind = "chat" if i % 4 in (1, 2) else "completions"
            stream = i % 2 == 0
            n = 2 if i % 5 == 0 else 1
            greedy = i % 3 != 2
            p = rng.randrange(len(PROMPTS))
            disconnect = rng.randint(1, 6) if stream and rng.random() < disconnect_fraction else None
            plan.append((kind, p, greedy, n, disconnect,
                         request_body(model, kind, p, greedy, n, stream, rng, greedy_tokens, sampled_tokens)))
        before = read_metrics(url, headers)
        start = time.monotonic()
        results = await asyncio.gather(*(one_request(client, kind, body, model, d)
                                         for kind, _, _, _, d, body in plan), return_exceptions=True)
        wall = time.monotonic() - start
    failures, mismatches, completed, abandoned, greedy_checked = [], [], 0, 0, 0
    for (kind, p, greedy, n, _, body), result in zip(plan, results):
        if isinstance(result, BaseException):
            failures.append(f"{kind} stream={body['stream']} n={n}: {result!r}"[:400])
        elif result is None:
            abandoned += 1
        else:
            completed += 1
            if greedy:
                greedy_checked += 1
                if result != [solo[kind, p]] * n:
                    mismatches.append({"kind": kind, "prompt": p, "n": n, "got": result, "solo": solo[kind, p]})
    after = wait_settled(url)
    return {
        "requests": num_requests, "streaming": sum(body["stream"] for *_, body in plan),
        "n2": sum(x[3] == 2 for x in plan), "completed": completed, "abandoned": abandoned,
        "failed": len(failures), "failures": failures[:10], "greedy_checked": greedy_checked,
        "greedy_mismatches": mismatches[:10], "num_greedy_mismatches": len(mismatches),
        "preemptions": after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"],
        "wall_s": round(wall, 2), "after": {k: after[k] for k in ("vllm:num_requests_running",
                                                                 "vllm:num_requests_waiting",
                                                                 "vllm:kv_cache_usage_perc")}}


def passed(summary: dict) -> bool:
    return (summary["failed"] == 0 and summary["num_greedy_mismatches"] == 0
            and all(v == 0 for v in summary["after"].values()))


def cmd_stress(args: argparse.Namespace) -> None:
    import logging
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    url = args.base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    summary = asyncio.run(run_stress(url, model, args.num_requests, args.disconnect_fraction, args.greedy_tokens,
                                     tuple(args.sampled_tokens), args.seed, args.api_key))
    summary["health"] = httpx.get(url + "/health", timeout=30).status_code
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)
    if not passed(summary) or summary["health"] != 200:
        raise SystemExit(1)


def add_parser(bench) -> None:
    p = bench.add_parser("stress", help="load a running server with disconnects; check outputs and no leaks")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--disconnect-fraction", type=float, default=0.2,
                   help="fraction of the streaming clients that walk away mid-stream")
    p.add_argument("--greedy-tokens", type=int, default=12)
    p.add_argument("--sampled-tokens", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the summary JSON here")
    p.set_defaults(func=cmd_stress)
