"""The engine's per-step bookkeeping, driven by a model runner that answers at once (no model)."""

import hashlib
import random
from pathlib import Path

from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.kv_cache import hash_block
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.model_runner import ModelOutput

CONFIG = str(Path(__file__).parent.parent / "pagedllm" / "data" / "qwen3-0.6b-config.json")


class _Done:
    def __init__(self, out):
        self.out = out

    def result(self):
        return self.out


class InstantRunner:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.rng = random.Random(0)

    def launch(self, sched_out):
        return _Done(ModelOutput(sampled={item.request.request_id: self.rng.randrange(1000)
                                          for item in sched_out.scheduled if item.samples}))

    def release(self, request_ids) -> None:
        pass


def _engine(max_num_batched_tokens: int = 256) -> LLMEngine:
    config, _ = EngineArgs(model=CONFIG, load_format="dummy", max_model_len=1024, device="cpu",
                           max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8).create_config()
    return LLMEngine(config, InstantRunner(num_blocks=512), None)


def test_hash_block_bytes_unchanged():
    """Prefix-cache keys: blake2b of the parent hash and the comma-joined decimal token ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\0")
    h.update(b"1,22,333")
    assert hash_block(None, [1, 22, 333]) == h.digest()


def test_counts_and_outputs_with_instant_runner():
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
    assert engine.stats.generation_tokens == sum((1 + i % 2) * (5 + i) for i in range(12))
    assert engine.stats.prompt_tokens >= sum(len(p) for p in prompts.values())
    assert not engine.states and not engine._owners
    engine.kv_cache.pool.check_invariants()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_prompt_tokens_counted_once_per_computation():
    """Chunked prefill over several steps counts every prompt token exactly once."""
    engine = _engine(max_num_batched_tokens=64)
    engine.add_request("a", list(range(200)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.prompt_tokens == 200
