"""Tensor parallelism on CPU: ranks are processes joined by gloo, exactly as on GPUs with NCCL.

- the weight loaders give each rank its piece (split or replicated) of every checkpoint tensor;
- greedy output with 2 ranks (and 4, where the KV heads are replicated) is token-for-token the
  output of one rank, with prefix caching hitting and preemption happening;
- nothing is left behind: after shutdown, after a rank dies, after Ctrl-C on `pagedllm serve`.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core_types import NewRequestData, SchedulerOutput
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.embedding import VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard
from pagedllm.worker.model_runner import ModelRunner
from server_fixtures import descendants, start_server, wait_gone
from tests.conftest import assert_no_leaks, random_prompts
from tests.test_invariance import shared_prefix_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
ROOT = Path(__file__).parent.parent


# ---- the pieces each rank loads ------------------------------------------------------------------

@pytest.mark.parametrize("tp", [2, 4])
def test_column_layer_splits_q_and_splits_or_replicates_kv(tp):
    q_rows, kv_rows = 4 * 3, 2 * 3              # 4 query heads, 2 KV heads of dim 3
    full_q, full_k = torch.randn(q_rows, 5), torch.randn(kv_rows, 5)
    pieces = []
    for rank in range(tp):
        kv = Shard(kv_rows, min(2, tp))
        layer = ColumnParallelLinear(5, [Shard(q_rows, tp), kv, kv], TPGroup(rank, tp), bias=False)
        layer.weight.weight_loader(layer.weight, full_q, 0)
        layer.weight.weight_loader(layer.weight, full_k, 1)
        layer.weight.weight_loader(layer.weight, -full_k, 2)
        q, k, v = layer.weight.data.split(layer.shard_sizes)
        pieces.append((q, k, v))
        assert torch.equal(v, -k)
    assert torch.equal(torch.cat([q for q, _, _ in pieces]), full_q)
    if tp == 2:   # one KV head each
        assert torch.equal(torch.cat([k for _, k, _ in pieces]), full_k)
    else:         # 2 KV heads over 4 ranks: ranks 0,1 hold head 0 and ranks 2,3 head 1
        assert [torch.equal(pieces[r][1], full_k[(r // 2) * 3:(r // 2 + 1) * 3]) for r in range(4)] == [True] * 4


def test_row_layer_and_padded_vocabulary_pieces():
    full = torch.randn(6, 8)
    parts = []
    for rank in range(4):
        layer = RowParallelLinear(8, 6, TPGroup(rank, 4), bias=False)
        layer.weight.weight_loader(layer.weight, full)
        parts.append(layer.weight.data)
    assert torch.equal(torch.cat(parts, dim=1), full)
    table = torch.randn(10, 4)                      # 10 rows over 4 ranks: 3, 3, 3, 1 + 2 padding
    rows = []
    for rank in range(4):
        emb = VocabParallelEmbedding(10, 4, TPGroup(rank, 4))
        emb.weight.weight_loader(emb.weight, table)
        rows.append(emb.weight.data)
    assert torch.equal(torch.cat(rows)[:10], table)
    assert not torch.cat(rows)[10:].any()


# ---- what the other ranks receive ----------------------------------------------------------------

class _RankZero:
    """Rank 0's group, in one process: records what it broadcasts (the model stays single-rank)."""
    size, rank = 2, 0

    def __init__(self):
        self.sent = []

    def broadcast_object(self, obj=None):
        self.sent.append(obj)
        return obj

    def broadcast(self, x):
        return x


def _recording_prepare(runner, batches):
    prepare = runner._prepare

    def recorded(out, requests):
        batch, sampling = prepare(out, requests)
        batches.append(batch)
        return batch, sampling
    runner._prepare = recorded


def test_other_ranks_flatten_each_step_from_the_diff_as_rank_zero_does(tiny_models):
    """A runner fed only rank 0's broadcasts (the scheduler's diff and the tokens read back)
    builds the same batch as rank 0 in every step, also for a request left out of a step after it
    sampled: rank 0 feeds it the value read back meanwhile, where the other rank's copy held a
    placeholder whose device row is gone."""
    path, _ = tiny_models["qwen3"]
    config, source = EngineArgs(model=path, max_model_len=64, kv_cache_memory=4 << 20).create_config()
    rank0, other = ModelRunner(config, source), ModelRunner(config, source)
    rank0.tp = _RankZero()
    other.tp = SimpleNamespace(size=2, rank=1, broadcast=lambda x: x.copy_(rank0._prev_tokens))
    batches0, batches1 = [], []
    _recording_prepare(rank0, batches0)
    _recording_prepare(other, batches1)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    steps = [
        SchedulerOutput(request_ids=["a", "b"], num_scheduled_tokens=[5, 3], num_computed_tokens=[0, 0],
                        new_requests=[NewRequestData("a", [1, 2, 3, 4, 5], params, [1], []),
                                      NewRequestData("b", [6, 7, 8], params, [2], [])]),
        SchedulerOutput(request_ids=["a"], num_scheduled_tokens=[1], num_computed_tokens=[5]),   # b sits out
        SchedulerOutput(request_ids=["a", "b"], num_scheduled_tokens=[1, 1], num_computed_tokens=[6, 3]),
    ]
    in_flight = None
    for out in steps:                          # as EngineCore.step: issue a step, then read the last one
        pending = rank0.execute_model(out)
        other.run_worker_step(*rank0.tp.sent[-1])
        if in_flight is not None:
            in_flight.result()
        in_flight = pending
    in_flight.result()
    assert rank0.tp.sent[-1][1], "step 3's broadcast carries the values read back"
    b_input = batches0[2].input_ids[1]
    assert b_input == rank0.input_batch.requests["b"].output_token_ids[0] and b_input >= 0
    for mine, theirs in zip(batches0, batches1, strict=True):
        for name in ("input_ids", "positions", "slot_mapping", "block_tables"):
            assert (getattr(mine, name) == getattr(theirs, name)).all(), name
        for name in ("cu_seqlens_q", "seq_lens", "logits_indices", "pending_at", "pending_rows"):
            assert getattr(mine, name) == getattr(theirs, name), name


# ---- whole engines over gloo ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_two_ranks_generate_what_one_rank_does(tiny_models, arch):
    path, _ = tiny_models[arch]
    prompts = shared_prefix_prompts()
    one = LLM(path, max_model_len=128, kv_cache_memory=16 << 20)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    threads = torch.get_num_threads()
    # a pool small enough to preempt, prefix caching on
    llm = LLM(path, max_model_len=128, tensor_parallel_size=2, num_gpu_blocks_override=16, block_size=8)
    workers = llm.llm_engine.model_info()["worker_pids"]
    try:
        for _ in range(2):   # the second round runs against a warm prefix cache
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
        stats = llm.llm_engine.get_stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
        assert_no_leaks(llm)
    finally:
        llm.shutdown()
    wait_gone(workers)
    assert torch.get_num_threads() == threads   # rank 0 shared the cores with rank 1 until shutdown


def test_four_ranks_replicate_kv_heads(tiny_models):
    """2 KV heads over 4 ranks: each pair of ranks holds the same head."""
    path, _ = tiny_models["llama"]
    prompts = random_prompts(5, 512, 5, 40, seed=21)
    expected = [o.outputs[0].token_ids for o in LLM(path, max_model_len=128, kv_cache_memory=16 << 20)
                .generate(prompts, GREEDY)]
    llm = LLM(path, max_model_len=128, tensor_parallel_size=4, kv_cache_memory=16 << 20)
    try:
        assert llm.llm_engine.model_info()["kv_pool_shape"][4] == 1
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
    finally:
        llm.shutdown()


@pytest.mark.parametrize("tp", [1, 2])
def test_llm_is_rebuilt_after_del_and_with_block(tiny_models, tp):
    """`del llm` (or leaving `with LLM(...)`) stops the engine and its ranks, and the next LLM in the
    same process starts cleanly (with 2 ranks: a new process group)."""
    path, _ = tiny_models["qwen3"]
    prompts = random_prompts(3, 512, 5, 20, seed=41)
    kwargs = dict(max_model_len=128, tensor_parallel_size=tp, kv_cache_memory=16 << 20)
    llm = LLM(path, **kwargs)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    workers = llm.llm_engine.model_info()["worker_pids"]
    assert len(workers) == tp - 1
    del llm
    wait_gone(workers)
    with LLM(path, **kwargs) as again:
        assert [o.outputs[0].token_ids for o in again.generate(prompts, GREEDY)] == expected
        workers = again.llm_engine.model_info()["worker_pids"]
    wait_gone(workers)


def test_bad_tensor_parallel_sizes(tiny_models):
    path, _ = tiny_models["qwen3"]
    for size, words in ((3, "attention heads"), (0, ">= 1")):
        with pytest.raises(ValueError, match="tensor_parallel_size") as info:
            LLM(path, max_model_len=128, tensor_parallel_size=size)
        assert words in str(info.value)


# ---- nothing left behind ----------------------------------------------------------------------------

def test_a_dying_rank_stops_every_process(tiny_models):
    """SIGKILL one worker: rank 0 exits with code 1 and no process is left (over gloo its next
    collective fails at once; over NCCL, which would wait forever, its watcher thread ends it)."""
    path, _ = tiny_models["qwen3"]
    script = textwrap.dedent(f"""
        import os, signal, time
        from pagedllm import LLM, SamplingParams
from pagedllm.core_types import NewRequestData, SchedulerOutput
from pagedllm.engine.engine_args import EngineArgs
        llm = LLM({path!r}, max_model_len=128, tensor_parallel_size=2, kv_cache_memory=16 << 20)
        pids = llm.llm_engine.model_info()["worker_pids"]
        print("workers", *pids, flush=True)
        os.kill(pids[0], signal.SIGKILL)
        while True:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
            time.sleep(0.1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    workers = [int(p) for p in out.split()[1:]]
    assert proc.returncode == 1, err[-2000:]
    wait_gone(workers)


def test_serve_with_two_ranks_then_ctrl_c(tiny_models):
    """`pagedllm serve --tensor-parallel-size 2` answers, and Ctrl-C (SIGINT to every process of
    the terminal's group) ends it with nothing left running."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    path, _ = tiny_models["qwen3"]
    proc, url, lines = start_server([path, "--tensor-parallel-size", "2", "--max-model-len", "128",
                                     "--kv-cache-memory", str(16 << 20)])
    family = descendants(proc.pid)
    try:
        assert len(family) >= 1
        r = httpx.post(url + "/v1/completions", json={"model": "smollm2", "prompt": [1, 2, 3, 4],
                                                      "max_tokens": 5, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        for pid in family | {proc.pid}:
            os.kill(pid, signal.SIGINT)
        proc.wait(60)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)[-2000:]
    wait_gone(family)
