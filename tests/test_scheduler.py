"""Scheduler invariants: token budget, chunked prefill mixed with decodes, preemption order, abort."""

from pagedllm.config import SchedulerConfig
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import PLACEHOLDER, Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256,
                             eos_token_ids=frozenset({0}))
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def req(rid, n, max_tokens=8):
    """Distinct prompts per request id, so no prefix is shared by accident."""
    base = 1000 * (sum(map(ord, rid)) % 50 + 1)
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   max_tokens)


def run_step(s: Scheduler, token: int = 5):
    """One synchronous step: schedule, launch, fill in the samples."""
    out = s.schedule()
    s.on_launched(out)
    sampled = {i.request.request_id: token for i in out.scheduled if i.samples}
    s.update_from_output(out, sampled)
    return out


def test_budget_and_chunked_prefill_mix_with_decode():
    s = make(budget=16)
    s.add_request(req("a", 10))
    s.add_request(req("b", 30))
    out = run_step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 10), ("b", 6)]
    assert out.num_batched_tokens <= 16
    out = s.schedule()
    # a decodes one token, b continues its prefill with the rest of the budget
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 15)]
    assert [i.samples for i in out.scheduled] == [True, False]
    s.on_launched(out)
    s.update_from_output(out, {"a": 5})
    out = s.schedule()
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    assert [i.samples for i in out.scheduled] == [True, True]


def test_max_num_seqs():
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and s.num_waiting == 2


def test_preempts_most_recent_and_recomputes():
    s = make(num_blocks=6, block_size=4, budget=64)
    s.add_request(req("old", 8, max_tokens=12))
    s.add_request(req("new", 8, max_tokens=12))
    run_step(s)
    assert s.kv_cache.num_free_blocks == 2
    preempted = []
    while s.has_unfinished():
        out = run_step(s)
        preempted += [r.request_id for r in out.preempted]
        s.kv_cache.pool.check_invariants()
    assert preempted and set(preempted) == {"new"}
    assert s.num_preemptions == len(preempted)
    assert s.kv_cache.num_free_blocks == 6


def test_finish_on_length_and_abort_free_blocks():
    s = make()
    s.add_request(req("a", 5, max_tokens=2))
    s.add_request(req("b", 5, max_tokens=50))
    run_step(s)
    run_step(s)
    assert "a" not in s.requests
    aborted = s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert aborted.status == RequestStatus.FINISHED_ABORTED
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks and not s.has_unfinished()


def test_pipelined_steps_use_placeholders():
    """Step N+1 is scheduled before step N's token arrives; a stop found late drops the extra token."""
    s = make(budget=64)
    s.add_request(Request("a", [11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=3), 3))
    first = s.schedule()
    s.on_launched(first)
    a = first.scheduled[0].request
    assert a.output_token_ids == [PLACEHOLDER] and a.num_known_tokens == 6
    second = s.schedule()            # decodes the placeholder before its value is known
    assert [(i.num_new_tokens, i.samples) for i in second.scheduled] == [(1, True)]
    s.on_launched(second)
    s.update_from_output(first, {"a": 7})
    assert a.output_token_ids == [7, PLACEHOLDER]
    third = s.schedule()
    s.on_launched(third)
    s.update_from_output(second, {"a": 0})   # EOS arrives: finish, drop the in-flight token
    assert a.is_finished and a.output_token_ids == [7, 0]
    s.update_from_output(third, {"a": 9})    # ignored: the request already finished
    assert a.output_token_ids == [7, 0] and s.kv_cache.num_free_blocks == s.kv_cache.num_blocks


def test_max_tokens_request_waits_for_its_last_token():
    s = make(budget=64)
    s.add_request(req("a", 4, max_tokens=1))
    first = s.schedule()
    s.on_launched(first)
    assert s.schedule().is_empty           # nothing to compute until the last token lands
    s.update_from_output(first, {"a": 5})
    assert not s.has_unfinished()
