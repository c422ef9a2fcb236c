"""The engine's per-step bookkeeping, driven by an executor that answers at once (no model): the
engine core and the offline front end around it."""

import hashlib
import random

import numpy as np
import pytest

from engine_fakes import InstantExecutor, dummy_config
from test_kv_cache import hash_block

from pagedllm.engine.client import InprocClient
from pagedllm.engine.core import EngineCore
from pagedllm.engine.input_processor import in_vocabulary
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams


def _engine(max_num_batched_tokens: int = 256) -> LLMEngine:
    config = dummy_config(max_num_batched_tokens)
    return LLMEngine(config, None, InprocClient(EngineCore(config, InstantExecutor(num_blocks=512))))


def test_hash_block_bytes_unchanged():
    """Prefix-cache keys: blake2b of the parent hash and the token ids as little-endian int64s (the
    same on every machine: the router and the engine cores compare them)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\0")
    h.update(b"".join(t.to_bytes(8, "little") for t in (1, 22, 333)))
    assert hash_block(None, [1, 22, 333]) == h.digest()


def test_counts_and_outputs_with_instant_executor():
    engine = _engine()
    rng = random.Random(1)
    prompts = {str(i): [rng.randrange(1000) for _ in range(rng.randint(20, 300))] for i in range(12)}
    kinds = ["final", "delta", "cumulative"]
    for i, (request_id, prompt) in enumerate(prompts.items()):
        params = SamplingParams(temperature=0.6, max_tokens=5 + i, ignore_eos=True, n=1 + i % 2,
                                output_kind=kinds[i % 3])
        engine.add_request(request_id, prompt, params)
    streamed = {request_id: [[], []] for request_id in prompts}   # delta outputs, per child
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                streamed[out.request_id][c.index] += c.token_ids
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
    assert sorted(finished) == sorted(prompts)
    for i, request_id in enumerate(prompts):
        n, max_tokens = 1 + i % 2, 5 + i
        outputs = finished[request_id].outputs
        assert len(outputs) == n or kinds[i % 3] == "delta"   # a delta's last output may omit a child
        if kinds[i % 3] == "delta":
            assert [len(t) for t in streamed[request_id][:n]] == [max_tokens] * n
        else:
            assert [len(c.token_ids) for c in outputs] == [max_tokens] * n
    stats = engine.get_stats()
    assert stats["generation_tokens"] == sum((1 + i % 2) * (5 + i) for i in range(12))
    assert stats["prompt_tokens_computed"] >= sum(len(p) for p in prompts.values())
    assert not engine.output_processor.requests
    kv = engine.kv_cache_state()
    assert kv["num_free_blocks"] == kv["num_blocks"] and kv["num_unfinished"] == 0


def test_prompt_tokens_counted_once_per_computation():
    """Chunked prefill over several steps counts every prompt token exactly once."""
    engine = _engine(max_num_batched_tokens=64)
    engine.add_request("a", list(range(200)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_stats()["prompt_tokens_computed"] == 200


def test_prompt_ids_checked_against_the_vocabulary():
    """The fast check accepts exactly the prompts a test per token would, and the engine names the prompt."""
    vocab = 1000
    for ids in ([0, 999], [5] * 300, [True, 3], [np.int64(3)], [-1, 5], [0, 1000], [3, 2.0], [3, "4"], [None],
                [3, 10 ** 30], [-10 ** 30]):
        assert in_vocabulary(ids, vocab) == all(type(t) is int and 0 <= t < vocab for t in ids), ids
    engine = _engine()
    for ids in ([1, -1], [1, 151936], [1, 2.5], ["a"]):
        with pytest.raises(ValueError, match="prompt token ids"):
            engine.add_request("bad", ids, SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()


def test_generate_starts_the_first_step_while_prompts_are_added():
    """LLM.generate runs a step each time STEP_EVERY_BUDGETS steps' worth of prompt tokens have been
    added, and adds the next ones while it runs; every request still completes, in input order."""
    engine = _engine(max_num_batched_tokens=256)
    core = engine.engine_core.core
    queued_at_step = []
    step = core.step
    core.step = lambda: queued_at_step.append(len(core.scheduler.requests)) or step()
    llm = LLM.__new__(LLM)
    llm.llm_engine = engine
    prompts = [[i + 1] * 100 for i in range(24)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=4, ignore_eos=True))
    assert queued_at_step[:3] == [11, 22, 24]   # every 1,100 tokens (>= 4 x 256), then all of them
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
    assert not engine.has_unfinished_requests() and not core.has_work()


def test_bad_prompt_after_the_first_step_started():
    """A ValueError for a later prompt aborts the ones added (one step already ran for them), and the
    next generate() runs normally."""
    engine = _engine(max_num_batched_tokens=256)
    llm = LLM.__new__(LLM)
    llm.llm_engine = engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([[1] * 600, [2] * 600, [3, -1]], params)
    core = engine.engine_core.core
    assert core.has_work() and not core.scheduler.has_unfinished()   # only the step that ran is in flight
    assert not engine.has_unfinished_requests()
    outputs = llm.generate([[4] * 50, [5] * 60], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 3]
    kv = engine.kv_cache_state()
    assert kv["num_free_blocks"] == kv["num_blocks"] and kv["num_unfinished"] == 0
