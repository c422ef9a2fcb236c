"""EngineCore: the scheduler, the KV cache manager and the executor, behind add / abort / step.

It knows token ids, never text: the front end (input and output processors) tokenizes, turns a
request with n > 1 into n sequences, detokenizes, and finds stop strings. Each step returns one
EngineCoreOutputs of arrays: the new token of every request that got one, finish reasons, and
logprobs where asked. It runs in the process that uses it (InprocClient) or in its own process
behind sockets (core_proc.py).

Steps are pipelined: step() schedules and issues step N, then finishes step N-1, which ran on the
device while step N was being prepared, and returns its outputs. A step with a request under a
grammar (structured outputs) is issued in two parts: its forward first; then, once step N-1's
tokens have advanced the grammars' matchers, the token bitmask and the sampling. The device runs
step N's forward while the host does that, so the pipeline holds.
"""

import logging
import time

from msgspec.structs import asdict

from pagedllm.config import EngineConfig
from pagedllm.core_types import EngineCoreOutputs, EngineCoreRequest, SchedulerOutput, SchedulerStats
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.snapshot import ColourBook, engine_snapshot
from pagedllm.engine.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)

# what a client may call by name between two steps (call_utility)
UTILITY_METHODS = frozenset({"reset_prefix_cache", "get_stats", "model_info", "kv_cache_state", "snapshot",
                             "record_steps"})


class EngineCore:
    def __init__(self, config: EngineConfig, executor, load_tokenizer=lambda: None) -> None:
        self.config = config
        self.executor = executor
        self.structured = StructuredOutputManager(load_tokenizer, pin_memory=config.device.startswith("cuda"))
        self._errors: dict[str, str] = {}     # for the next outputs: sequences given up on here
        num_blocks = executor.num_blocks
        min_pool = -(-config.model.max_model_len // config.cache.block_size)
        if num_blocks < min_pool:
            raise ValueError(f"the KV cache ({num_blocks} blocks) cannot hold one request of max_model_len "
                             f"{config.model.max_model_len}: lower max_model_len or give the cache more memory")
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        if config.data_parallel_size > 1 and config.cache.enable_prefix_caching:
            self.kv_cache.pool.record_events()   # the front ends route by this core's cached blocks
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self._in_flight: tuple[SchedulerOutput, object] | None = None
        self.prompt_tokens = 0          # prompt tokens computed (a recompute counts again)
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}    # finish reason -> requests
        self.num_steps = 0
        self.num_decode_steps = 0
        self.step_time = 0.0
        self._snapshot_ids: dict = {}   # the dashboard snapshot's per-request cache
        self._colours = ColourBook()    # and its colours, kept from poll to poll
        self._step_log: list[tuple[int, int, int, int]] | None = None   # step shapes, for benchmarks

    @classmethod
    def from_config(cls, config: EngineConfig, source) -> "EngineCore":
        from pagedllm.executor import make_executor
        from pagedllm.models.loader import load_tokenizer
        executor = make_executor(config, source)
        try:
            return cls(config, executor, lambda: load_tokenizer(source))
        except BaseException:
            executor.shutdown()
            raise

    def shutdown(self, graceful: bool = True) -> None:
        self.structured.shutdown()
        self.executor.shutdown(graceful)

    # ---- requests ---------------------------------------------------------------------------
    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queue validated sequences (the front end checked them against the model's limits)."""
        max_len = self.config.model.max_model_len
        for r in requests:
            params = r.sampling_params
            max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(r.prompt_token_ids)
            request = Request(r.request_id, r.prompt_token_ids, params, max_tokens, arrival_time=r.arrival_time)
            if params.structured_outputs is not None:
                self.structured.add(request)
            self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort at any time; the blocks are freed at once (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            if self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED) is not None:
                self.finished["abort"] = self.finished.get("abort", 0) + 1

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        start = time.monotonic()
        self._give_up_on_broken_grammars()
        sched_out = self.scheduler.schedule()
        launched = None
        if not sched_out.is_empty:
            self.prompt_tokens += sched_out.num_prompt_tokens
            if self._step_log is not None:
                self._step_log.append(self._step_shape(sched_out))
            launched = (sched_out, self._guarded(sched_out, lambda: self.executor.execute_model(sched_out)))
        if launched is None and self._in_flight is None:
            self.structured.wait(0.05)    # nothing to run until a grammar compiles: wait, do not spin
        outputs = self._complete(*self._in_flight) if self._in_flight is not None else EngineCoreOutputs()
        if launched is not None and launched[1].needs_bitmask:
            bitmask = self.structured.bitmask(self.scheduler.sampling_requests(sched_out))
            self._guarded(sched_out, lambda: launched[1].sample(*bitmask))
        self._in_flight = launched
        if self._errors:
            outputs.errors, self._errors = self._errors, {}
        self.num_steps += 1
        self.step_time += time.monotonic() - start
        return outputs

    @staticmethod
    def _guarded(sched_out: SchedulerOutput, fn):
        """fn(), with the step's request ids in the log should the model or the sampler fail."""
        try:
            return fn()
        except Exception:
            logger.exception("the model failed in a step with requests %s", sched_out.request_ids)
            raise

    def _give_up_on_broken_grammars(self) -> None:
        for request in self.structured.take_failed():
            if self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED) is not None:
                error = request.grammar.future.exception()
                self._errors[request.request_id] = f"its grammar could not be compiled: {error}"

    def _complete(self, sched_out: SchedulerOutput, pending) -> EngineCoreOutputs:
        model_out = self._guarded(sched_out, pending.result)
        advanced = self.scheduler.update_from_output(sched_out, model_out)
        out = EngineCoreOutputs(timestamp=time.monotonic())
        self._advance_grammars([item for item in advanced if item.request.grammar is not None])
        for item in advanced:
            request = item.request
            request_id = request.request_id
            token = request.output_token_ids[item.output_index]
            out.request_ids.append(request_id)
            out.new_token_ids.append(token)
            if item.output_index == 0:
                out.num_cached_tokens[request_id] = max(0, request.num_cached_tokens)
                out.queue_time[request_id] = request.scheduled_time - request.arrival_time
            if request.is_finished:
                reason = request.finish_reason
                out.finished[request_id] = (reason, request.stop_reason)
                self.finished[reason] = self.finished.get(reason, 0) + 1
            entry = model_out.logprobs.get(request_id)
            if entry is not None:
                out.logprobs[request_id] = entry
        out.prompt_logprobs = model_out.prompt_logprobs   # (the front end drops those of aborted requests)
        if advanced:
            self.generation_tokens += len(advanced)
            self.num_decode_steps += 1
        return out

    def _advance_grammars(self, items: list) -> None:
        """Constrained requests' matchers take their new tokens; a grammar that is complete ends its
        request (as a stop), one that refuses the token (never, with the masks applied) aborts it."""
        items = [item for item in items if not item.request.is_finished]
        if not items:
            return
        tokens = [item.request.output_token_ids[item.output_index] for item in items]
        for item, token, accepted in zip(items, tokens, self.structured.accept([i.request for i in items], tokens)):
            request = item.request
            if not accepted:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
                self._errors[request.request_id] = f"token {token} broke its grammar"
            elif self.structured.terminated(request):
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    # ---- named calls (between two steps) ---------------------------------------------------------
    def call_utility(self, method: str, args: list):
        if method not in UTILITY_METHODS:
            raise ValueError(f"unknown engine core call {method!r}")
        return getattr(self, method)(*args)

    def take_block_events(self) -> tuple[list[bytes], list[bytes]]:
        """Prefix-block hashes cached and evicted since the last call (recorded with data parallelism)."""
        return self.kv_cache.pool.take_events()

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache
        return SchedulerStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_computed=self.prompt_tokens, generation_tokens=self.generation_tokens,
            num_steps=self.num_steps, num_decode_steps=self.num_decode_steps, step_time=self.step_time,
            structured_requests=self.structured.num_requests, grammar_compile_time=self.structured.compile_time,
            grammar_mask_time=self.structured.mask_time)

    def get_stats(self) -> dict:
        return asdict(self.make_stats())

    def record_steps(self, on: bool) -> list[tuple[int, int, int, int]]:
        """Start (on) or stop logging the shape of each step; returns the steps logged since the
        last call, each (tokens computed, rows sampled, attended (query, key) pairs, the scheduled
        requests' contexts after the step): what a compute-aware roofline needs."""
        logged = self._step_log or []
        self._step_log = [] if on else None
        return logged

    def _step_shape(self, out: SchedulerOutput) -> tuple[int, int, int, int]:
        spans = list(zip(out.num_computed_tokens, out.num_scheduled_tokens))
        return (sum(n for _, n in spans), len(self.scheduler.sampling_requests(out)),
                sum(n * start + n * (n + 1) // 2 for start, n in spans), sum(start + n for start, n in spans))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached-and-free prefix block (blocks in use stay)."""
        self.kv_cache.reset_prefix_cache()
        return True

    def model_info(self) -> dict:
        return {**self.executor.model_info(), "num_blocks": self.kv_cache.num_blocks,
                "worker_pids": self.executor.worker_pids}

    def kv_cache_state(self) -> dict:
        """The block pool's invariants checked (an AssertionError if broken) and its counts."""
        self.kv_cache.pool.check_invariants()
        return {"num_blocks": self.kv_cache.num_blocks, "num_free_blocks": self.kv_cache.num_free_blocks,
                "num_unfinished": len(self.scheduler.requests), "in_flight": self._in_flight is not None}

    def snapshot(self, max_cells: int | None = None) -> dict:
        """The dashboard's picture of the engine (engine/snapshot.py)."""
        kwargs = {} if max_cells is None else {"max_cells": max_cells}
        return engine_snapshot(self, self._colours, id_cache=self._snapshot_ids, **kwargs)
