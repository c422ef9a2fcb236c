"""The OpenAI-compatible server, end to end: a real uvicorn server (subprocess) on the bundled
SmolLM2 GGUF, driven with the official `openai` SDK (sync and async) and raw HTTP for bad input."""

import asyncio
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from server_fixtures import server  # noqa: F401 - session fixture

from pagedllm import SamplingParams

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture()
def http(server):  # noqa: F811
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=120) as c:
        yield c


def metrics(server) -> dict[str, float]:  # noqa: F811
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(vllm:[a-z0-9_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            labels = m.group(2) or ""
            reason = re.search(r'finished_reason="(\w+)"', labels)
            key = m.group(1) + (f"[{reason.group(1)}]" if reason else "")
            out[key] = float(m.group(3))
    return out


def wait_idle(server, timeout: float = 10.0) -> dict:  # noqa: F811
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# ---- plain endpoints -------------------------------------------------------------------------------
def test_models_health_version_tokenize(server, client, http):  # noqa: F811
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert httpx.get(server.url + "/health").status_code == 200    # not behind the API key
    assert "version" in httpx.get(server.url + "/version").json()
    tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == PROMPT
    m = metrics(server)
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:request_success_total[stop]",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count"):
        assert name in m, name


# ---- completions -----------------------------------------------------------------------------------
def test_completion_and_stream_agree(server, client):  # noqa: F811
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == server.model
    assert out.created > 0
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    n_prompt = len(httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"])
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == n_prompt + 8

    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion_logprobs_and_echo(server, client):  # noqa: F811
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset)

    echo = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                     logprobs=1)
    assert echo.choices[0].text == PROMPT + out.choices[0].text
    elp = echo.choices[0].logprobs
    n_prompt = echo.usage.prompt_tokens
    assert len(elp.tokens) == n_prompt + 4
    assert elp.token_logprobs[0] is None and all(v is not None for v in elp.token_logprobs[1:])
    assert elp.text_offset[0] == 0
    plain_echo = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                           echo=True)
    assert plain_echo.choices[0].text == PROMPT + out.choices[0].text and plain_echo.choices[0].logprobs is None


def test_token_id_prompts_and_n(server, client, http):  # noqa: F811
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=server.model, prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == by_text.choices[0].text
    assert two.usage.prompt_tokens == len(ids) + 3 and two.usage.completion_tokens == 12

    n2 = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=1)
    assert sorted(c.index for c in n2.choices) == [0, 1] and n2.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=1.0,
                                              n=2, seed=1, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in n2.choices}   # same seed, same samples


def test_stop_strings(server, client):  # noqa: F811
    base = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip()[2:5] if len(text.strip()) > 6 else text.strip()[:2]
    cut = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


# ---- chat -------------------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_and_stream(server, client):  # noqa: F811
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert out.usage.completion_tokens == len(out.choices[0].logprobs.content) if out.choices[0].logprobs else True
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [out.choices[0].finish_reason]


def test_chat_logprobs_and_n(server, client):  # noqa: F811
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token   # greedy
    n2 = client.chat.completions.create(model=server.model, messages=MESSAGES, max_completion_tokens=5, n=2,
                                        seed=3)
    assert [c.index for c in n2.choices] == [0, 1] and n2.usage.completion_tokens <= 10


def test_async_client_five_concurrent(server):  # noqa: F811
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        prompts = [f"Count to {i}:" for i in range(5)]
        sequential = [(await client.completions.create(model=server.model, prompt=p, max_tokens=8,
                                                       temperature=0)).choices[0].text for p in prompts[:2]]

        async def one(p):
            return await client.completions.create(model=server.model, prompt=p, max_tokens=8, temperature=0)

        async def one_stream(p):
            text = ""
            async for chunk in await client.chat.completions.create(
                    model=server.model, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0,
                    stream=True):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            return text

        results = await asyncio.gather(*(one(p) for p in prompts), *(one_stream(p) for p in prompts[:2]))
        await client.close()
        return sequential, results

    sequential, results = asyncio.run(main())
    assert [r.choices[0].text for r in results[:2]] == sequential   # batching does not change greedy output
    assert all(r.usage.completion_tokens == 8 for r in results[:5])
    assert all(isinstance(r, str) and r for r in results[5:])
    m = wait_idle(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_prefix_cache_counters_rise(server, client):  # noqa: F811
    system = "You are a helpful assistant that answers questions about geography. " * 12
    before = metrics(server)
    for q in ("Capital of Spain?", "Capital of Italy?", "Capital of Peru?"):
        client.chat.completions.create(model=server.model, max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": q}])
    after = metrics(server)
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert queries > 300 and hits >= 2 * 96   # the 2nd and 3rd requests reuse the system prompt's blocks
    assert after["vllm:prompt_tokens_total"] > before["vllm:prompt_tokens_total"]
    assert after["vllm:request_success_total[length]"] >= before["vllm:request_success_total[length]"] + 3


# ---- bad input --------------------------------------------------------------------------------------
LONG_IDS = [1] * 2100
BAD = [
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 5000}, "max_tokens"),
    ("/v1/completions", {"prompt": LONG_IDS, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": PROMPT, "min_p": 3}, "min_p"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 5}, "presence_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "frequency_penalty": -5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": "yes"}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 4000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 2100}]}, "prompt"),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": "abc"}, "seed"),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": 2 ** 70}, "seed"),
    ("/v1/completions", {"prompt": "\ud800 lone surrogate"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{prm}-{i}" for i, (p, _, prm)
                                                        in enumerate(BAD)])
def test_bad_input_is_400(server, http, path, body, param):  # noqa: F811
    r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400 and error["message"]
    if param != "messages":
        assert error["param"] == param, error


def test_malformed_json_auth_and_unknown_model(server, http, client):  # noqa: F811
    r = http.post("/v1/completions", content=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = http.post("/v1/chat/completions", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert httpx.post(server.base_url + "/completions", json={"prompt": "hi"}).status_code == 401
    r = httpx.post(server.base_url + "/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, top_p=7)
    assert http.get("/v1/nothing").status_code == 404
    # the engine survived all of it
    assert httpx.get(server.url + "/health").status_code == 200
    ok = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    assert ok.usage.completion_tokens == 2


# ---- disconnects ------------------------------------------------------------------------------------
def test_client_disconnect_mid_stream_frees_request(server, http):  # noqa: F811
    body = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    before = metrics(server)["vllm:request_success_total[abort]"]
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                json.loads(line[6:])
                seen += 1
            if seen >= 3:
                break
        m = metrics(server)
        assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
    m = wait_idle(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total[abort]"] == before + 1


def test_client_disconnect_non_streaming_frees_request(server):  # noqa: F811
    body = {"messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/chat/completions", json=body, timeout=1.5,
                   headers={"Authorization": f"Bearer {server.api_key}"})
    m = wait_idle(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


# ---- what real clients rely on -------------------------------------------------------------------------
def _readme_sdk_snippet() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python", readme.index("Point the official SDK at it"))
    return readme[start + len("```python"):readme.index("```", start + 3)]


def test_readme_sdk_snippet_runs_as_pasted(server, capsys):  # noqa: F811
    code = _readme_sdk_snippet().replace("http://localhost:8000/v1", server.base_url)
    code = code.replace('api_key="unused"', f'api_key="{server.api_key}"')   # the test server has a key
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    # the answer (sampled, so any text), then one line per token: its 3 likeliest tokens and chances
    shaped = [bool(re.match(r"^.+: .+ \d+%, .+ \d+%, .+ \d+%$", line)) for line in lines]
    first = shaped.index(True)
    assert 0 < first and all(shaped[first:]) and 1 <= len(lines) - first <= 5, lines


def test_echo_with_max_tokens_0_scores_the_prompt(server, client, smollm):  # noqa: F811
    prompt = "The capital of France is Paris"
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    [choice] = out.choices
    assert choice.text == prompt and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    offline = smollm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    ids = offline.prompt_token_ids
    assert out.usage.prompt_tokens == len(ids) and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None
    expected = [offline.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    streamed = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=0, echo=True,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    assert streamed[-1].choices[0].finish_reason == "length"


def test_prompt_tokens_count_whole_prompts_when_cached(server, client, http):  # noqa: F811
    prompt = "A prompt long enough to fill a few blocks of the prefix cache. " * 4
    n = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    rises = []
    for _ in range(2):
        before = metrics(server)
        client.completions.create(model=server.model, prompt=prompt, max_tokens=1)
        after = metrics(server)
        rises.append((after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"],
                      after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]))
    assert [r[0] for r in rises] == [n, n] and rises[1][1] >= 16, rises   # the repeat hit the cache


def test_tokenizer_info(server):  # noqa: F811
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()   # no key: not under /v1
    assert info["tokenizer_class"] and info["eos_token"] == "<|im_end|>" and info["vocab_size"] == 49152
    assert "<|im_start|>" in info["chat_template"]
    assert not any(key.endswith("_file") for key in info)


# ---- the server computes what the offline engine computes ------------------------------------------
def test_greedy_through_the_server_equals_llm_generate(server, client, smollm):  # noqa: F811
    prompts = [PROMPT, "def fibonacci(n):", "Three French cities are"]
    params = SamplingParams(temperature=0, max_tokens=16)
    offline = [o.outputs[0].token_ids for o in smollm.generate(prompts, params)]
    served = client.completions.create(model=server.model, prompt=prompts, max_tokens=16, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in served.choices] == offline
    streamed = []
    for chunk in client.completions.create(model=server.model, prompt=prompts[1], max_tokens=16, temperature=0,
                                           stream=True, extra_body={"return_token_ids": True}):
        streamed += chunk.choices[0].model_extra["token_ids"]
    assert streamed == offline[1]


@pytest.mark.parametrize("client_kind,processes,stream", [("aiohttp", 1, True), ("aiohttp", 2, False),
                                                         ("openai", 1, True)])
def test_bench_serve_client(server, client_kind, processes, stream):  # noqa: F811
    from pagedllm.bench import serve as bench
    cfg = bench.ClientConfig(server.base_url, server.model, server.api_key, stream, 0.0, True, 120, client_kind,
                             20.0, 2)
    requests = bench.build_requests(SimpleNamespace(dataset="random", input_len=16, output_len=4, vocab_size=32000,
                                                    seed=0), 3)
    summary = bench.benchmark(cfg, requests, processes)
    assert summary["completed"] == 3 and summary["failed"] == 0, summary
    assert summary["total_output_tokens"] == 12 and summary["total_input_tokens"] == 48
    assert summary["client_processes"] == processes and summary["client_cpu_s"] > 0
    if stream:
        assert summary["mean_ttft_ms"] > 0 and summary["p99_itl_ms"] >= summary["p50_itl_ms"] > 0
