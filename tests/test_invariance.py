"""Outputs do not depend on scheduling: prefix caching, chunk size, batch mates, preemption.
And nothing leaks: every block is free once requests end or are aborted."""

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.request import RequestStatus
from tests.conftest import assert_no_leaks, core_of, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def shared_prefix_prompts() -> list[list[int]]:
    """Prompts that share long prefixes (so prefix caching really hits), plus unrelated ones."""
    base = random_prompts(2, 512, 48, 48, seed=11)
    tails = random_prompts(6, 512, 1, 20, seed=12)
    return [base[i % 2] + t for i, t in enumerate(tails)] + random_prompts(3, 512, 5, 60, seed=13)


@pytest.fixture(scope="module")
def reference(tiny_models):
    path, _ = tiny_models["qwen3"]
    llm = LLM(path, kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = shared_prefix_prompts()
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    return path, prompts, alone


@pytest.mark.parametrize("kwargs", [
    dict(enable_prefix_caching=True),
    dict(enable_prefix_caching=False),
    dict(enable_prefix_caching=True, max_num_batched_tokens=7),
    dict(enable_prefix_caching=True, max_num_batched_tokens=33, max_num_seqs=3),
    dict(enable_prefix_caching=True, num_gpu_blocks_override=16, block_size=8),
    dict(enable_prefix_caching=False, num_gpu_blocks_override=10, max_num_batched_tokens=16),
], ids=["cache-on", "cache-off", "chunk-7", "chunk-33-seqs-3", "tiny-pool-preempt", "tiny-pool-no-cache"])
def test_batched_equals_alone(reference, kwargs):
    path, prompts, alone = reference
    llm = LLM(path, max_model_len=128, **kwargs)
    for _ in range(2):  # second round runs against a warm prefix cache
        outputs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == alone
    stats = llm.llm_engine.get_stats()
    if "num_gpu_blocks_override" in kwargs:
        assert stats["num_preemptions"] > 0
    if kwargs.get("enable_prefix_caching"):
        assert stats["prefix_cache_hits"] > 0
    assert_no_leaks(llm)


def test_abort_frees_everything(tiny_models):
    path, _ = tiny_models["qwen3"]
    llm = LLM(path, max_model_len=128, kv_cache_memory=4 << 20)
    engine = llm.llm_engine
    prompts = random_prompts(6, 512, 10, 50, seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=1 + i % 2))
    for _ in range(3):
        engine.step()
    assert engine.get_stats()["kv_cache_usage"] > 0
    engine.abort_request("r0")   # running
    engine.abort_request("r5")
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in ("r0", "r5")
        if "r2" in engine.output_processor.requests:
            engine.abort_request("r2")
    assert_no_leaks(llm)


def test_waiting_abort_and_status(tiny_models):
    path, _ = tiny_models["qwen3"]
    llm = LLM(path, max_model_len=128, kv_cache_memory=4 << 20, max_num_seqs=1)
    engine = llm.llm_engine
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    engine.add_request("b", [4, 5, 6], SamplingParams(max_tokens=5))
    engine.step()
    request_b = core_of(llm).scheduler.requests["b"]
    assert request_b.status == RequestStatus.WAITING
    engine.abort_request("b")
    assert request_b.status == RequestStatus.FINISHED_ABORTED
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(llm)
