"""Cascade attention: the host-side plan (which decoding sequences share which cached blocks)
and, on CPU with the Triton kernels under the interpreter, the engine end to end: greedy outputs
with shared-prefix tiles (in decode steps, and for the single-token sequences of mixed steps) equal
the plain torch backend's, eagerly and through the CUDA-graph input path (graphs stood in for by
eager runs, as in test_cuda_graph_padding.py)."""

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.attention import TritonBackend
from pagedllm.worker import cuda_graphs, model_runner, shared_prefix
from pagedllm.worker.shared_prefix import MIN_SHARED_BLOCKS, plan_shared_prefixes
from tests.conftest import assert_no_leaks, random_prompts
from tests.test_cuda_graph_padding import _with_eager_buckets
from tests.triton_interpreter import patch_interpreter

BS = 4

if not torch.cuda.is_available():
    patch_interpreter()


def _tables(rows):
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)


def test_plan_groups_sequences_by_their_common_leading_blocks():
    prefix_a = [10, 11, 12, 13, 14]
    prefix_b = [20, 21, 22, 23]
    rows = [prefix_a + [30, 31],          # 0: group a
            [40, 41, 42, 43, 44, 45],     # 1: alone
            prefix_a + [50],              # 2: group a
            prefix_b + [60],              # 3: group b
            prefix_a[:4] + [70, 71],      # 4: group a, agrees on 4 blocks only
            prefix_b + [80, 81]]          # 5: group b
    seq_lens = np.array([27, 24, 23, 18, 23, 26])
    plan = plan_shared_prefixes(_tables(rows), seq_lens, BS, tile_size=2)
    # group a: 3 members x 4 blocks (member 4 cuts it to 4) saves more than b: 2 x 4
    assert plan.tile_lens.tolist() == [16, 16, 16]
    assert plan.tile_seqs.tolist() == [[0, 2], [4, -1], [3, 5]]
    assert plan.shared_lens.tolist() == [16, 0, 16, 16, 16, 16]


def test_plan_shares_only_blocks_inside_every_context():
    prefix = [1, 2, 3, 4, 5, 6]
    rows = [prefix + [7], prefix]
    # the second sequence holds 5 whole blocks (22 tokens): the sixth is its partly written last
    plan = plan_shared_prefixes(_tables(rows), np.array([25, 22]), BS, tile_size=8)
    assert plan.tile_lens.tolist() == [5 * BS]
    assert plan.shared_lens.tolist() == [20, 20]


def test_plan_leaves_out_sequences_of_length_zero():
    prefix = [1, 2, 3, 4, 5]
    rows = [prefix + [6], prefix + [7], prefix + [8]]
    plan = plan_shared_prefixes(_tables(rows), np.array([22, 0, 23]), BS, tile_size=4)
    assert plan.tile_seqs.tolist() == [[0, 2, -1, -1]]
    assert plan.shared_lens.tolist() == [20, 0, 20]
    assert plan_shared_prefixes(_tables(rows), np.array([22, 0, 0]), BS, tile_size=4) is None


def test_plan_none_without_enough_sharing():
    alone = _tables([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    assert plan_shared_prefixes(alone, np.array([20, 20]), BS, 4) is None
    short = [1, 2, 3][:MIN_SHARED_BLOCKS - 1]
    few = _tables([short + [40, 41, 42], short + [50, 51, 52]])
    assert plan_shared_prefixes(few, np.array([24, 24]), BS, 4) is None


def test_plan_caps_the_tile_count(monkeypatch):
    monkeypatch.setattr(shared_prefix, "MAX_TILES", 3)
    rows = [[g * 10 + b for b in range(5)] + [100 + i] for g in range(4) for i in range(2 + g)]
    plan = plan_shared_prefixes(_tables(rows), np.full(len(rows), 24), BS, tile_size=2)
    assert len(plan.tile_lens) == 3
    assert plan.tile_seqs.tolist() == [[9, 10], [11, 12], [13, -1]]   # the largest group first
    assert (plan.shared_lens > 0).sum() == 5


GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def _shared_prompts():
    """Three system prompts of 40 tokens (5 blocks of 8) x 4 requests, and two unrelated prompts."""
    systems = random_prompts(3, 512, 40, 40, seed=31)
    prompts = [systems[i % 3] + tail for i, tail in enumerate(random_prompts(12, 512, 2, 9, seed=32))]
    return prompts + random_prompts(2, 512, 10, 30, seed=33)


def _use_triton_attention(llm: LLM, plans: list):
    """Swap the model's attention to the Triton backend (interpreted on CPU) and record each
    decode step's plan."""
    runner = llm.llm_engine.model_runner
    backend = TritonBackend(runner.max_model_len)
    for attn in runner.model.attention_layers():
        attn.backend = backend
    attn = runner.model.attention_layers()[0]
    runner.shared_tile_size = backend.shared_tile_seqs(attn.num_heads, attn.num_kv_heads)

    def recording(tables, seq_lens, *args):
        plan = plan_shared_prefixes(tables, seq_lens, *args)
        plans.append((plan, bool((seq_lens == 0).any())))    # a mixed step's chunks have length 0 here
        return plan
    return recording


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-inputs"])
def test_cascade_decode_gives_the_plain_outputs(tiny_models, monkeypatch, graphs):
    path, _ = tiny_models["qwen3"]
    prompts = _shared_prompts()
    kwargs = dict(max_model_len=64, max_num_batched_tokens=128, max_num_seqs=16, kv_cache_memory=8 << 20,
                  block_size=8)
    expected = [o.outputs[0].token_ids for o in LLM(path, **kwargs).generate(prompts, GREEDY)]
    monkeypatch.setattr(shared_prefix, "MAX_TILES", 4)
    monkeypatch.setattr(cuda_graphs, "MAX_TILES", 4)
    llm = LLM(path, **kwargs)
    plans = []
    monkeypatch.setattr(model_runner, "plan_shared_prefixes", _use_triton_attention(llm, plans))
    buckets = _with_eager_buckets(llm) if graphs else []
    for _ in range(2):   # the second round: every system prompt already cached
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
    used = [(p, mixed) for p, mixed in plans if p is not None]
    assert used and max(p.tile_lens.max() for p, _ in used) == 40
    assert any((p.shared_lens == 0).any() for p, _ in used)   # sequences in no tile beside tiled ones
    assert any(mixed for _, mixed in used) and not all(mixed for _, mixed in used)
    if graphs:
        assert {"shared", "mixed"} <= {b.kind for b in buckets if b.replays}
    assert_no_leaks(llm)
