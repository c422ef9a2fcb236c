"""Reliability and security of the server (issue 5), against real `pagedllm serve` processes on loopback:
hostile bodies by hand and by schemathesis, auth, a load test with client disconnects on a deliberately
small KV pool, overload (503 + Retry-After) and SIGTERM. A dying engine core: test_server_processes.py."""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest
from server_fixtures import API_KEY, MODEL, server, start_server  # noqa: F401 - session fixture

from pagedllm.bench.stress import wait_settled

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Say hello."}]
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error(r, status: int | tuple = None) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code in ((status,) if isinstance(status, int) else status), (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"] and error["code"] == r.status_code, error


# ---- hostile bodies, by hand (the session server: max_model_len 2048, API key) -----------------------
def _j(obj) -> bytes:
    return json.dumps(obj).encode()


C, CH = "/v1/completions", "/v1/chat/completions"
HOSTILE = [
    ("truncated JSON", C, b'{"prompt": "hi", "max_tokens": ', 400),
    ("not JSON", CH, b"hello there", 400),
    ("JSON array", C, b"[1, 2, 3]", 400),
    ("JSON null", C, b"null", 400),
    ("empty body", C, b"", 400),
    ("deeply nested", C, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}', 400),
    ("UTF-8 encoded surrogate", C, b'{"prompt": "\xed\xa0\x80x", "max_tokens": 2}', 400),
    ("escaped lone surrogate", C, _j({"prompt": "a\ud800b", "max_tokens": 2}), 400),
    ("lone surrogate in chat", CH, _j({"messages": [{"role": "user", "content": "\udfff"}]}), 400),
    ("prompt wrong type", C, _j({"prompt": {"a": 1}}), 400),
    ("max_tokens wrong type", C, _j({"prompt": PROMPT, "max_tokens": [1]}), 400),
    ("max_tokens float", C, _j({"prompt": PROMPT, "max_tokens": 2.5}), 400),
    ("max_tokens zero", C, _j({"prompt": PROMPT, "max_tokens": 0}), 400),
    ("max_tokens negative", C, _j({"prompt": PROMPT, "max_tokens": -7}), 400),
    ("max_tokens huge", C, _j({"prompt": PROMPT, "max_tokens": 10 ** 30}), 400),
    ("max_completion_tokens huge", CH, _j({"messages": MESSAGES, "max_completion_tokens": 2 ** 63}), 400),
    ("n 10000", C, _j({"prompt": PROMPT, "n": 10000, "max_tokens": 2}), 400),
    ("n 10000 chat", CH, _j({"messages": MESSAGES, "n": 10000, "max_tokens": 2}), 400),
    ("n negative", C, _j({"prompt": PROMPT, "n": -1}), 400),
    ("logprobs 1000", C, _j({"prompt": PROMPT, "logprobs": 1000, "max_tokens": 2}), 400),
    ("top_logprobs 1000", CH, _j({"messages": MESSAGES, "logprobs": True, "top_logprobs": 1000}), 400),
    ("temperature inf", C, b'{"prompt": "hi", "temperature": 1e999, "max_tokens": 2}', 400),
    ("temperature NaN", C, b'{"prompt": "hi", "temperature": NaN, "max_tokens": 2}', 400),
    ("top_p -inf", C, b'{"prompt": "hi", "top_p": -Infinity}', 400),
    ("logit_bias NaN", C, b'{"prompt": "hi", "logit_bias": {"5": NaN}}', 400),
    ("logit_bias out of vocab", C, _j({"prompt": PROMPT, "logit_bias": {str(10 ** 12): 1}}), 400),
    ("100 stop strings", C, _j({"prompt": PROMPT, "stop": [f"s{i}" for i in range(100)]}), 400),
    ("10 kB stop string", C, _j({"prompt": PROMPT, "stop": "x" * 10000}), 400),
    ("10k stop_token_ids", C, _j({"prompt": PROMPT, "stop_token_ids": list(range(10000))}), 400),
    ("1000 prompts", C, _j({"prompt": ["hi"] * 1000, "max_tokens": 1}), 400),
    ("10 MB prompt", C, _j({"prompt": "hello " * ((10 << 20) // 6), "max_tokens": 2}), 413),
    ("10 MB messages", CH, _j({"messages": [{"role": "user", "content": "y" * (10 << 20)}]}), 413),
    ("prompt over max_model_len", C, _j({"prompt": "hello " * 3000, "max_tokens": 2}), 400),
    ("token ids over max_model_len", C, _j({"prompt": [42] * 2048, "max_tokens": 1}), 400),
    ("messages over max_model_len", CH, _j({"messages": [{"role": "user", "content": "hi " * 3000}]}), 400),
    ("empty prompt", C, _j({"prompt": "", "max_tokens": 2}), 400),
    ("empty prompt list", C, _j({"prompt": []}), 400),
    ("empty prompt in list", C, _j({"prompt": ["hi", ""], "max_tokens": 2}), 400),
    ("empty token list in list", C, _j({"prompt": [[1, 2], []], "max_tokens": 2}), 400),
    ("empty messages", CH, _j({"messages": []}), 400),
    ("token id out of vocab", C, _j({"prompt": [1, 2, 10 ** 9], "max_tokens": 2}), 400),
    ("token id huge", C, _j({"prompt": [10 ** 40], "max_tokens": 2}), 400),
    ("token id negative", C, _j({"prompt": [[5], [-3]], "max_tokens": 2}), 400),
    ("unknown role", CH, _j({"messages": [{"role": "root", "content": "hi"}]}), 400),
    ("role missing", CH, _j({"messages": [{"content": "hi"}]}), 400),
    ("role wrong type", CH, _j({"messages": [{"role": 7, "content": "hi"}]}), 400),
    ("content part not text", CH, _j({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400),
    ("message not an object", CH, _j({"messages": ["hi"]}), 400),
    ("unknown model", C, _j({"model": "gpt-4", "prompt": PROMPT}), 404),
    ("tokenize nothing", "/tokenize", _j({}), 400),
    ("tokenize lone surrogate", "/tokenize", _j({"prompt": "\ud800"}), 400),
    ("detokenize out of vocab", "/detokenize", _j({"tokens": [10 ** 20]}), 400),
    ("detokenize wrong type", "/detokenize", _j({"tokens": "abc"}), 400),
]


@pytest.fixture(scope="module")
def http(server):  # noqa: F811
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=120) as c:
        yield c


@pytest.mark.parametrize("name,path,body,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_gets_4xx(server, http, name, path, body, status):  # noqa: F811
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, status)


ODD_BUT_VALID = [
    {"prompt": PROMPT, "top_k": 10 ** 30},
    {"prompt": PROMPT, "top_k": 100000, "top_p": 1e-300, "min_p": 1e-300},
    {"prompt": PROMPT, "temperature": 1e-320},
    {"prompt": PROMPT, "seed": 2 ** 63 - 1, "n": 2, "temperature": 1},
    {"prompt": PROMPT, "seed": -(2 ** 63), "n": 2, "temperature": 1},
    {"prompt": PROMPT, "min_tokens": 2, "stop_token_ids": [10 ** 30, 0, 2]},
    {"prompt": PROMPT, "logit_bias": {"0": 100, "49151": -100}},
    {"prompt": PROMPT, "stop": ["\u0000", "\ud7ff", "\U0001F600"]},
    {"prompt": [[1, 2, 3], "text"][0], "echo": True, "logprobs": 20},
    {"prompt": "\u0000\u200b\U0001F600 \u202e", "echo": True},
    {"prompt": PROMPT, "n": 16, "max_tokens": 1},
    {"prompt": PROMPT, "unknown_field": {"nested": [1, 2]}, "user": "x" * 10000},
]


@pytest.mark.parametrize("body", ODD_BUT_VALID, ids=[str(i) for i in range(len(ODD_BUT_VALID))])
def test_odd_but_valid_bodies_succeed(server, http, body):  # noqa: F811
    r = http.post(C, json={"max_tokens": 2, **body})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == body.get("n", 1)


def test_still_serving_after_hostile_bodies(server, http):  # noqa: F811
    assert httpx.get(server.url + "/health").status_code == 200
    r = http.post(C, json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    m = wait_settled(server.url)
    assert (m["vllm:num_requests_running"], m["vllm:kv_cache_usage_perc"]) == (0, 0)


def test_auth_open_endpoints_and_wrong_keys(server):  # noqa: F811
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {API_KEY}x"},
                    {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"Authorization": API_KEY},
                    {"Authorization": f"bearer {API_KEY}"}, {"Authorization": "Bearer \u00e9\u00e9".encode("utf-8")}):
        for method, path in (("GET", "/v1/models"), ("POST", C), ("POST", CH)):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": PROMPT}, timeout=30)
            assert_error(r, 401)
    # an unauthenticated caller cannot make the server read a huge body either
    r = httpx.post(server.url + C, content=b"x" * (4 << 20), headers={"Content-Type": "application/json"})
    assert_error(r, 401)


# ---- schemathesis against /openapi.json --------------------------------------------------------------
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

FUZZ_CASES = {"tried": 0, "2xx": 0, "4xx": 0}


def _bounded(case) -> None:
    """Keep generated generation requests short (a valid max_tokens of 1500 would take minutes on CPU);
    invalid values (negative, zero, wrong types) are left for the server to refuse."""
    body = case.body
    if not isinstance(body, dict) or not case.path.startswith("/v1/"):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 4):
            body[key] = 4
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2


FUZZ_EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "20"))


def test_fuzz_openapi_no_5xx(server):  # noqa: F811
    """Every operation of /openapi.json, with schema-valid (positive) and schema-violating (negative)
    generated inputs: never a 5xx, every error an OpenAI error body. (Driven through hypothesis
    directly: schemathesis' pytest plugin does not run under this pytest.)"""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {server.api_key}"}
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def run(case):
                _bounded(case)
                response = case.call(base_url=server.url, headers=headers, timeout=60)
                FUZZ_CASES["tried"] += 1
                if response.status_code >= 500:
                    failures.append((case.method, case.path, repr(case.body)[:200], response.text[:200]))
                elif response.status_code >= 400:
                    FUZZ_CASES["4xx"] += 1
                    if case.path != "/metrics":
                        assert set(response.json()["error"]) == ERROR_KEYS, response.text[:300]
                else:
                    FUZZ_CASES["2xx"] += 1
            try:
                run()
            except Unsatisfiable:      # nothing schema-violating to send to a GET without parameters
                pass
    print(f"\nschemathesis: {FUZZ_CASES}")
    assert not failures, failures[:5]


def test_fuzz_left_server_healthy(server, http):  # noqa: F811
    print(f"\nschemathesis cases: {FUZZ_CASES}")
    assert httpx.get(server.url + "/health").status_code == 200
    m = wait_settled(server.url)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"]) == (0, 0, 0)


# ---- a server with a deliberately small KV pool: load, overload, SIGTERM ------------------------------
SMALL_MAX_NUM_SEQS = 8
SMALL_MAX_WAITING = 64
SHUTDOWN_TIMEOUT = 6


@pytest.fixture(scope="module")
def small_server():
    # 45 KiB per token (SmolLM2-135M, float32): 12 MiB is 17 blocks of 16 = 272 tokens, just over one
    # max_model_len request, while 8 running requests of up to ~100 tokens want far more: preemption.
    proc, url, lines = start_server(["--max-model-len", "256", "--kv-cache-memory", str(12 << 20),
                                     "--max-num-seqs", str(SMALL_MAX_NUM_SEQS), "--max-waiting-requests",
                                     str(SMALL_MAX_WAITING), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)])
    try:
        yield proc, url, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.load
def test_load_with_disconnects_on_small_kv_pool(small_server):
    """pagedllm.bench.stress (`pagedllm bench stress`) at CI size."""
    from pagedllm.bench.stress import run_stress
    proc, url, _ = small_server
    num_requests = int(os.environ.get("PAGEDLLM_LOAD_REQUESTS", "40"))
    summary = asyncio.run(run_stress(url, MODEL, num_requests=num_requests, disconnect_fraction=0.2,
                                     greedy_tokens=12, sampled_tokens=(24, 64), seed=0))
    print(f"\nload: {summary['requests']} concurrent requests ({summary['streaming']} streaming, "
          f"{summary['n2']} with n=2), {summary['abandoned']} clients disconnected mid-stream, "
          f"{summary['completed']} completed, {summary['greedy_checked']} greedy results checked against "
          f"their solo text, {summary['preemptions']:.0f} preemptions, wall {summary['wall_s']} s")
    assert summary["failed"] == 0, summary["failures"]
    assert summary["num_greedy_mismatches"] == 0, summary["greedy_mismatches"]
    assert summary["completed"] + summary["abandoned"] == num_requests
    assert summary["abandoned"] >= 1 and summary["preemptions"] >= 1, summary
    assert proc.poll() is None and httpx.get(url + "/health").status_code == 200
    assert summary["after"] == {"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0,
                                "vllm:kv_cache_usage_perc": 0}, summary["after"]


@pytest.mark.load
def test_overload_gets_503_with_retry_after(small_server):
    proc, url, _ = small_server
    capacity = SMALL_MAX_NUM_SEQS + SMALL_MAX_WAITING
    total = capacity + 16

    async def main():
        limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=total + 8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            opened = []

            async def open_one(i):
                body = {"prompt": f"{i} " + PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
                request = client.build_request("POST", C, json=body)
                r = await client.send(request, stream=True)
                opened.append(r)
                return r.status_code, r.headers.get("retry-after"), (await r.aread()) if r.status_code != 200 else b""

            try:
                return await asyncio.gather(*(open_one(i) for i in range(total)))
            finally:
                for r in opened:
                    await r.aclose()

    statuses = asyncio.run(main())
    ok = [s for s in statuses if s[0] == 200]
    refused = [s for s in statuses if s[0] != 200]
    print(f"\noverload: {len(statuses)} at once, {len(ok)} admitted, {len(refused)} refused with 503")
    assert len(ok) <= capacity and len(refused) >= total - capacity
    for status, retry_after, body in refused:
        assert status == 503 and retry_after == "1"
        assert set(json.loads(body)["error"]) == ERROR_KEYS
    assert proc.poll() is None
    m = wait_settled(url)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"]) == (0, 0, 0)


def _refused(url: str) -> bool:
    host, port = url.rsplit("//", 1)[1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def _read_stream(client, body: dict, out: dict, started: threading.Event | None = None) -> None:
    """Read one streaming completion into out["chunks"]; out["error"] if the connection broke."""
    out["chunks"] = []
    try:
        with client.stream("POST", C, json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["chunks"].append(line)
                    if started is not None:
                        started.set()
    except httpx.HTTPError as exc:
        out["error"] = exc
    finally:
        if started is not None:
            started.set()


def test_sigterm_drains_running_requests_then_exits_0(small_server):
    """SIGTERM: no new connections; a short request in flight finishes; a long one is cut when
    --shutdown-timeout runs out; the process exits 0."""
    proc, url, lines = small_server
    short = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "stream": True, "temperature": 0}
    long = {"prompt": PROMPT, "max_tokens": 230, "ignore_eos": True, "stream": True, "temperature": 0}
    long_out, short_out, started = {}, {}, threading.Event()
    with httpx.Client(base_url=url, timeout=120) as client:
        reader = threading.Thread(target=_read_stream, args=(client, long, long_out, started), daemon=True)
        reader.start()
        assert started.wait(60)
        with client.stream("POST", C, json=short) as r:
            assert r.status_code == 200
            chunks, refused_during_drain = [], None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line)
                if len(chunks) == 2:
                    proc.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    deadline = signalled + 5
                    while not _refused(url) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    refused_during_drain = _refused(url)
        code = proc.wait(SHUTDOWN_TIMEOUT + 30)
        exited = time.monotonic() - signalled
        reader.join(30)
    assert refused_during_drain, "the server still accepted connections after SIGTERM"
    assert chunks[-1] == "data: [DONE]", chunks[-3:]
    assert json.loads(chunks[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-1])
    # the long request was cut when the grace period ran out (no [DONE]), and the exit was clean
    assert long_out["status"] == 200 and "data: [DONE]" not in long_out["chunks"], long_out["chunks"][-2:]
    assert code == 0, "".join(lines[-30:])
    assert exited < SHUTDOWN_TIMEOUT + 10, exited
    print(f"\nSIGTERM: short request finished, long one cut after {len(long_out['chunks'])} chunks, "
          f"exit 0 after {exited:.1f} s")
