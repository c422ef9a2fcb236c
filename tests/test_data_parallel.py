"""Data parallelism with local processes: two engine cores behind one front end.

Offline (LLM(data_parallel_size=2)): greedy output equals one core's, and on 8 system prompts x 12
requests sent at once, prefix routing keeps the single engine's prefix-cache hit rate while
round-robin loses some. Served (`pagedllm serve -dp 2`): both cores have their own metrics series;
kill -9 of one core fails only its requests, /health names it, the other core still answers, and
SIGTERM lets the request in flight finish and leaves nothing behind."""

import json
import os
import random
import signal
import threading
import time

import pytest

from pagedllm import LLM, SamplingParams
from server_fixtures import cmdline, descendants, start_server, wait_gone

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

VOCAB = 512   # the tiny Qwen3 checkpoint's (conftest.TINY)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_each_core_gets_its_own_gpus(monkeypatch):
    """Core i takes tensor_parallel_size GPUs in order from CUDA_VISIBLE_DEVICES (or from 0)."""
    from types import SimpleNamespace

    from pagedllm.engine.client import core_device_env

    def config(dp, tp, device="cuda"):
        return SimpleNamespace(data_parallel_size=dp, device=device, model=SimpleNamespace(tensor_parallel_size=tp))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [core_device_env(config(2, 2), i) for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert core_device_env(config(3, 1), 2) == {"CUDA_VISIBLE_DEVICES": "2"}
    assert core_device_env(config(1, 2), 0) == {} and core_device_env(config(2, 1, "cpu"), 1) == {}


def _tenant_prompts(seed: int = 0) -> list[list[int]]:
    """8 system prompts of 128 tokens, 12 requests each with 16 tokens of their own, shuffled."""
    rng = random.Random(seed)
    systems = [[rng.randrange(VOCAB) for _ in range(128)] for _ in range(8)]
    prompts = [system + [rng.randrange(VOCAB) for _ in range(16)] for system in systems for _ in range(12)]
    rng.shuffle(prompts)
    return prompts


def _hit_rate(llm: LLM, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Every prompt at once; the prefix-cache hit rate over them and the greedy outputs."""
    engine = llm.llm_engine
    engine.reset_prefix_cache()
    before = engine.get_stats()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    after = engine.get_stats()
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return hits / (after["prefix_cache_queries"] - before["prefix_cache_queries"]), [
        o.outputs[0].token_ids for o in outputs]


def test_prefix_routing_keeps_the_hit_rate_and_greedy_output(tiny_models):
    """On the tiny Qwen3 checkpoint: routing and hit rates do not depend on the model, and a bigger one
    only made this test slower (97 s with SmolLM2 on the 2-core CI machine)."""
    path, _ = tiny_models["qwen3"]
    kwargs = dict(max_model_len=512, kv_cache_memory=3 << 19)   # 3,072 tokens a core, as SmolLM2 had in 128 MiB
    prompts = _tenant_prompts()
    with LLM(path, **kwargs) as one:
        single, expected = _hit_rate(one, prompts)
    rates = {}
    for routing in ("prefix", "round-robin"):
        with LLM(path, data_parallel_size=2, routing=routing, **kwargs) as llm:
            rates[routing], outputs = _hit_rate(llm, prompts)
            assert outputs == expected, f"{routing}: greedy output differs from one engine's"
            kv = llm.llm_engine.kv_cache_state()
            assert kv["num_free_blocks"] == kv["num_blocks"] and kv["num_unfinished"] == 0
    print(f"hit rates: one engine {single:.3f}, prefix {rates['prefix']:.3f}, round-robin {rates['round-robin']:.3f}")
    assert rates["prefix"] >= single - 0.05
    assert rates["round-robin"] < rates["prefix"] - 0.03


def _stream(url: str, out: list, index: int, max_tokens: int = 120, started: threading.Event | None = None) -> None:
    """One long streamed completion; out[index] = (tokens it reported, the error event or None)."""
    tokens, error = 0, None
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "prompt": "Count with me:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                if started is not None:
                    started.set()
                event = json.loads(line[6:])
                if "error" in event:
                    error = line
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    out[index] = (tokens, error)


@pytest.mark.slow
def test_a_killed_core_fails_only_its_requests():
    # one API process (not the default one per core): its router alone places the four streams, two a core
    proc, url, lines = start_server(["--max-model-len", "512", "--kv-cache-memory", str(32 << 20), "-dp", "2",
                                     "--api-server-count", "1"])
    family = descendants(proc.pid)
    cores = [p for p in family if "pagedllm.engine.core_proc" in cmdline(p)]
    try:
        assert len(cores) == 2
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=30).text
        for engine in "01":
            assert f'vllm:num_requests_running{{engine="{engine}",model_name="smollm2"}}' in metrics
        results = [None] * 4
        streams = [threading.Thread(target=_stream, args=(url, results, i)) for i in range(4)]
        for t in streams:
            t.start()
        time.sleep(3)    # every stream is running: two on each core (the least-loaded core in turn)
        os.kill(cores[0], signal.SIGKILL)
        for t in streams:
            t.join(120)
        failed = [r for r in results if r[1] is not None]
        assert len(failed) == 2 and all("engine core" in r[1] for r in failed), results
        assert all(r[0] == 120 for r in results if r[1] is None), results
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert sorted(e["running"] for e in health.json()["engines"]) == [False, True]
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        draining, started = [None], threading.Event()    # SIGTERM lets a request in flight finish
        last = threading.Thread(target=_stream, args=(url, draining, 0, 40, started))
        last.start()
        assert started.wait(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    last.join(60)
    assert draining[0] == (40, None)
    assert code == 1, "".join(lines[-30:])     # a core was lost: a supervisor should know
    wait_gone(family)
