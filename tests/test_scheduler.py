"""Scheduler invariants: token budget, chunked prefill mixed with decodes, preemption order, abort,
and the plain diff it gives the worker."""

from pagedllm.config import SchedulerConfig
from pagedllm.core_types import ModelRunnerOutput
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


def batch(out) -> list[tuple[str, int]]:
    return list(zip(out.request_ids, out.num_scheduled_tokens))


def sampling(s: Scheduler, out) -> list[str]:
    """The step's requests that sample (their last output is this step's placeholder)."""
    return [r for r in out.request_ids if r in s.requests and s.requests[r].output_token_ids[-1:] == [PLACEHOLDER]]


def results(sampled: dict[str, int]) -> ModelRunnerOutput:
    return ModelRunnerOutput(request_ids=list(sampled), sampled_token_ids=list(sampled.values()))


def run_step(s: Scheduler, token: int = 5):
    """One synchronous step: schedule, then fill in the samples."""
    out = s.schedule()
    if not out.is_empty:
        s.update_from_output(out, results({r: token for r in sampling(s, out)}))
    return out


def test_budget_and_chunked_prefill_mix_with_decode():
    s = make(budget=16)
    s.add_request(req("a", 10))
    s.add_request(req("b", 30))
    out = run_step(s)
    assert batch(out) == [("a", 10), ("b", 6)] and sum(out.num_scheduled_tokens) <= 16
    out = s.schedule()
    # a decodes one token, b continues its prefill with the rest of the budget
    assert batch(out) == [("a", 1), ("b", 15)] and sampling(s, out) == ["a"]
    s.update_from_output(out, results({"a": 5}))
    out = s.schedule()
    assert batch(out) == [("a", 1), ("b", 9)] and sampling(s, out) == ["a", "b"]


def test_worker_gets_requests_once_then_new_blocks():
    s = make(budget=64, block_size=4)
    s.add_request(req("a", 6, max_tokens=12))
    first = run_step(s)
    assert [n.request_id for n in first.new_requests] == ["a"] and first.new_requests[0].block_ids == [0, 1]
    assert first.num_computed_tokens == [0]
    blocks_seen = list(first.new_requests[0].block_ids)
    for _ in range(6):
        out = run_step(s)
        assert not out.new_requests
        blocks_seen += out.new_block_ids.get("a", [])
    assert blocks_seen == s.requests["a"].block_ids
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.add_request(req("b", 3))
    assert run_step(s).finished_request_ids == ["a"]


def test_max_num_seqs():
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.request_ids) == 2 and s.num_waiting == 2


def test_preempts_most_recent_and_recomputes():
    s = make(num_blocks=6, block_size=4, budget=64)
    old, new = req("old", 8, max_tokens=12), req("new", 8, max_tokens=12)
    s.add_request(old)
    s.add_request(new)
    run_step(s)
    assert s.kv_cache.num_free_blocks == 2
    resumed = []
    while s.has_unfinished():
        out = run_step(s)
        resumed += [(n.request_id, len(n.output_token_ids)) for n in out.new_requests]
        s.kv_cache.pool.check_invariants()
    assert old.num_preemptions == 0 and new.num_preemptions > 0
    assert s.num_preemptions == new.num_preemptions
    # a preempted request comes back whole, with the tokens it had generated
    assert resumed and all(rid == "new" and n > 0 for rid, n in resumed)
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
    a = s.requests["a"]
    assert a.output_token_ids == [PLACEHOLDER] and a.num_known_tokens == 6
    second = s.schedule()            # decodes the placeholder before its value is known
    assert batch(second) == [("a", 1)] and a.output_token_ids == [PLACEHOLDER, PLACEHOLDER]
    s.update_from_output(first, results({"a": 7}))
    assert a.output_token_ids == [7, PLACEHOLDER]
    third = s.schedule()
    s.update_from_output(second, results({"a": 0}))   # EOS arrives: finish, drop the in-flight token
    assert a.is_finished and a.output_token_ids == [7, 0]
    s.update_from_output(third, results({"a": 9}))    # ignored: the request already finished
    assert a.output_token_ids == [7, 0] and s.kv_cache.num_free_blocks == s.kv_cache.num_blocks


def test_max_tokens_request_waits_for_its_last_token():
    s = make(budget=64)
    s.add_request(req("a", 4, max_tokens=1))
    first = s.schedule()
    assert s.schedule().is_empty           # nothing to compute until the last token lands
    s.update_from_output(first, results({"a": 5}))
    assert not s.has_unfinished()
