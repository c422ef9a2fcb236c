"""`pagedllm serve`'s processes: two API processes sharing one port and one engine core (both
answer, /metrics adds them up, --stream-interval spaces the events), and the faults: kill -9 of the
engine core (requests in flight end with an error, /health answers 503, the server exits non-zero,
nothing is left) and kill -9 of the API process (the core exits by itself)."""

import asyncio
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
from server_fixtures import MODEL, cmdline, descendants, start_server, wait_gone

from pagedllm.entrypoints.launcher import api_server_count

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PROMPT = "The capital of France is"
SMALL = ["--max-model-len", "512", "--kv-cache-memory", str(32 << 20)]


def _connections(pid: int, port: int) -> int:
    """TCP connections to `port` that process `pid` holds open (from /proc: its socket inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _role(pid: int) -> str:
    line = cmdline(pid)
    return "core" if "pagedllm.engine.core_proc" in line else "api" if "pagedllm.entrypoints.launcher" in line else ""


def test_api_processes_default_to_one_per_engine_core():
    assert api_server_count(None, SimpleNamespace(data_parallel_size=1)) == 1
    assert api_server_count(None, SimpleNamespace(data_parallel_size=3)) == 3
    assert api_server_count(2, SimpleNamespace(data_parallel_size=3)) == 2
    with pytest.raises(ValueError, match="api_server_count"):
        api_server_count(0, SimpleNamespace(data_parallel_size=2))


def test_two_api_processes_share_one_core():
    proc, url, lines = start_server([*SMALL, "--api-server-count", "2", "--stream-interval", "4"])
    try:
        family = descendants(proc.pid)
        apis = [p for p in family if _role(p) == "api"]
        assert len(apis) == 2 and sum(_role(p) == "core" for p in family) == 1, [cmdline(p) for p in family]
        success, generated = _metric(url, "vllm:request_success_total"), _metric(url, "vllm:generation_tokens_total")
        port = int(url.rsplit(":", 1)[1])

        async def burst():
            limits = httpx.Limits(max_keepalive_connections=0)   # a new connection for every request
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                async def one(i):
                    body = {"prompt": f"{i} {PROMPT}", "max_tokens": 6, "ignore_eos": True, "temperature": 0,
                            "stream": True, "return_token_ids": True}
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        lines = r.aiter_lines()
                        tokens = len(json.loads((await anext(lines))[6:])["choices"][0]["token_ids"])
                        await barrier.wait()      # every connection open at once: see who holds them
                        held.append(0)
                        if len(held) == 16:
                            held.extend(_connections(p, port) for p in apis)
                        async for line in lines:
                            if line.startswith("data: {"):
                                tokens += len(json.loads(line[6:])["choices"][0]["token_ids"])
                        return tokens

                barrier, held = asyncio.Barrier(16), []
                counts = await asyncio.gather(*(one(i) for i in range(16)))
                return counts, held[16:]

        counts, per_process = asyncio.run(burst())
        assert counts == [6] * 16
        assert sum(per_process) == 16 and min(per_process) >= 1, per_process   # the kernel spread them
        assert _metric(url, "vllm:request_success_total") == success + 16   # the processes' counters add up
        assert _metric(url, "vllm:generation_tokens_total") == generated + 16 * 6
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        assert httpx.get(url + "/dashboard/state", timeout=30).json()["counters"]["num_running"] == 0

        # --stream-interval 4: the first token at once, then 4 tokens per event, the rest at the end (a
        # reader that falls behind gets the events it missed merged into one)
        sizes = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "prompt": PROMPT, "max_tokens": 10, "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    sizes.append(len(json.loads(line[6:])["choices"][0]["token_ids"]))
        assert sizes[0] == 1 and sum(sizes) == 10 and len(sizes) <= 4, sizes
        assert all(size % 4 == 0 for size in sizes[1:-1]), sizes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines[-30:])
    finally:
        proc.kill()
    wait_gone(family)


def _stream_until_error(url: str, out: dict, started: threading.Event) -> None:
    out["lines"] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["lines"].append(line)
                    started.set()
    except httpx.HTTPError as exc:
        out["error"] = exc
    finally:
        started.set()


def test_killing_the_core_fails_requests_and_stops_the_server():
    proc, url, lines = start_server(SMALL)
    family = descendants(proc.pid)
    [core] = [p for p in family if _role(p) == "core"]
    streamed, started = {}, threading.Event()
    reader = threading.Thread(target=_stream_until_error, args=(url, streamed, started), daemon=True)
    reader.start()
    waiting = {}
    plain = threading.Thread(target=lambda: waiting.update(r=httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True})), daemon=True)
    plain.start()
    try:
        assert started.wait(60)
        time.sleep(0.3)
        os.kill(core, signal.SIGKILL)
        deadline, health = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                break
            if health == 503:
                break
            time.sleep(0.05)
        assert health == 503
        code = proc.wait(30)
        reader.join(30)
        plain.join(30)
    finally:
        proc.kill()
    assert code == 1, "".join(lines[-30:])
    error = json.loads(streamed["lines"][-2][6:])["error"]
    assert streamed["lines"][-1] == "data: [DONE]" and error["code"] == 500 and "engine core" in error["message"]
    r = waiting["r"]
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    wait_gone(family)


def test_killing_the_api_process_stops_the_core():
    proc, url, _ = start_server(SMALL)
    family = descendants(proc.pid)
    assert any(_role(p) == "core" for p in family)
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    proc.kill()
    proc.wait(10)
    wait_gone(family, timeout=15)
