"""Token-budget continuous batching: decides each step which requests run and with how many tokens.

Every step, running requests go first (a decode is one token, an unfinished prefill continues with
a chunk), then waiting requests are admitted while the token budget and max_num_seqs allow, reusing
cached prefix blocks. A prompt larger than the remaining budget is split into chunks, so one step
can mix prefill chunks with decodes. When the pool runs dry, the most recently admitted request is
preempted: its blocks are released and it is recomputed later (its full blocks usually survive in
the prefix cache, so the recompute is cheap). The scheduler never touches tensors.

Its output is plain data (core_types.SchedulerOutput), a diff for the worker: a request's prompt,
parameters and blocks the first time it runs (and again when it resumes after a preemption), then
only its new blocks. The scheduler keeps its own record of each step until the step's results come
back.

Steps are pipelined: step N+1 is scheduled while step N runs on the device. A token sampled by
step N is a PLACEHOLDER in the request until its value arrives (the model runner feeds it to step
N+1 straight from device memory); stops that depend on the value (EOS, stop ids, stop strings) are
applied when it arrives, so a stopping request may compute one token that is never delivered.
"""

import time
from collections import deque
from dataclasses import dataclass

from pagedllm.config import SchedulerConfig
from pagedllm.core_types import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import PLACEHOLDER, Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """The scheduler's own record of one request in a step."""
    request: Request
    num_new_tokens: int
    start: int                    # position of the first token computed this step
    samples: bool                 # this step reaches the last token, so the next one is sampled
    output_index: int = -1        # where the sampled token goes in output_token_ids


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []     # for the worker, with the next step
        self._in_flight: deque[tuple[SchedulerOutput, list[ScheduledRequest]]] = deque()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """The next step. A non-empty output must be executed: its sampled tokens are reserved
        as placeholders at once, and update_from_output expects its results in order."""
        items: list[ScheduledRequest] = []
        num_prompt_tokens = 0
        allocate_slots = self.kv_cache.allocate_slots
        budget = self.config.max_num_batched_tokens
        index = 0
        preempted = False
        # the hot loop (every running request, every step): lengths are read directly rather
        # than through Request's properties
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_outputs = len(request.output_token_ids)
            if num_outputs >= request.max_tokens:
                index += 1   # its last token is still in flight; it finishes when that lands
                continue
            num_prompt = len(request.prompt_token_ids)
            start = request.num_computed_tokens
            num_new = min(num_prompt + num_outputs - start, budget)
            assert num_new > 0, "a running request always has a token to compute"
            while not allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                items.append(ScheduledRequest(request, num_new, start, start + num_new == num_prompt + num_outputs))
                if start < num_prompt:
                    num_prompt_tokens += min(num_new, num_prompt - start)
                budget -= num_new
                index += 1
        if not preempted:
            num_prompt_tokens += self._admit_waiting(items, budget)
        return self._launch(items, num_prompt_tokens)

    def _admit_waiting(self, items: list[ScheduledRequest], budget: int) -> int:
        """Admit waiting requests into the step; returns the prompt tokens they compute. A request
        whose grammar is still compiling keeps its place and lets the ones behind it by."""
        block_size = self.kv_cache.block_size
        num_prompt_tokens = 0
        not_ready = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.grammar is not None and not request.grammar.ready():
                not_ready.append(self.waiting.popleft())
                continue
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                request.scheduled_time = time.monotonic()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            request.num_blocks_sent = -1     # the worker reads it whole
            self.running.append(request)
            items.append(ScheduledRequest(request, num_new, num_cached, num_cached + num_new == request.num_tokens))
            num_prompt_tokens += min(num_new, max(0, request.num_prompt_tokens - num_cached))
            budget -= num_new
        self.waiting.extendleft(reversed(not_ready))
        return num_prompt_tokens

    def _launch(self, items: list[ScheduledRequest], num_prompt_tokens: int) -> SchedulerOutput:
        """The plain output for the worker; the step counts as running from here: its tokens are
        computed and each token it samples is reserved as a placeholder (so the next step can be
        scheduled, with the placeholder as input, before the values reach the host)."""
        if not items:
            return SchedulerOutput(num_prompt_tokens=num_prompt_tokens)   # the finished ids wait for a step
        out = SchedulerOutput(finished_request_ids=self._finished_ids, num_prompt_tokens=num_prompt_tokens)
        self._finished_ids = []
        new_blocks = out.new_block_ids
        for item in items:
            request = item.request
            out.request_ids.append(request.request_id)
            out.num_scheduled_tokens.append(item.num_new_tokens)
            out.num_computed_tokens.append(item.start)
            sent = request.num_blocks_sent
            if sent < 0:
                out.new_requests.append(NewRequestData(
                    request.request_id, request.prompt_token_ids, request.sampling_params,
                    list(request.block_ids), list(request.output_token_ids)))
                request.num_blocks_sent = len(request.block_ids)
            elif sent < len(request.block_ids):
                new_blocks[request.request_id] = request.block_ids[sent:]
                request.num_blocks_sent = len(request.block_ids)
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                request.output_token_ids.append(PLACEHOLDER)
                item.output_index = len(request.output_token_ids) - 1
        self._in_flight.append((out, items))
        return out

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def sampling_requests(self, out: SchedulerOutput) -> list[Request]:
        """The requests that sample in step `out` (in flight), in batch order."""
        for recorded, items in self._in_flight:
            if recorded is out:
                return [item.request for item in items if item.samples]
        raise KeyError("not a step in flight")

    def update_from_output(self, out: SchedulerOutput, model_out: ModelRunnerOutput) -> list[ScheduledRequest]:
        """Fill in the step's sampled tokens and finish requests that hit a token-level stop.
        Returns the records of the requests that got a new token (it is at output_index)."""
        recorded, items = self._in_flight.popleft()
        assert recorded is out, "step results must come back in launch order"
        sampled = dict(zip(model_out.request_ids, model_out.sampled_token_ids))
        advanced = []
        cache_blocks = self.kv_cache.cache_blocks
        for item in items:
            request = item.request
            if not item.samples or request.is_finished:
                continue  # a prefill chunk, or finished/aborted while the step ran
            token = sampled[request.request_id]
            request.output_token_ids[item.output_index] = token
            cache_blocks(request)
            advanced.append(item)
            status = self._token_stop(request, token, item.output_index + 1)
            if status is not None:
                self.finish_request(request.request_id, status)
        return advanced

    def _token_stop(self, request: Request, token: int, num_outputs: int) -> RequestStatus | None:
        """Stops decided by the token's value, for the request's num_outputs-th output token."""
        params = request.sampling_params
        if num_outputs >= params.min_tokens:
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in self.config.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_outputs >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request wherever it is, freeing its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = status
        self._finished_ids.append(request_id)
        while request.output_token_ids and request.output_token_ids[-1] == PLACEHOLDER:
            request.output_token_ids.pop()   # a token sampled after the stop: never delivered
        return request
