"""Token-budget continuous batching: decides each step which requests run and with how many tokens.

Every step, running requests go first (a decode is one token, an unfinished prefill continues with
a chunk), then waiting requests are admitted while the token budget and max_num_seqs allow, reusing
cached prefix blocks. A prompt larger than the remaining budget is split into chunks, so one step
can mix prefill chunks with decodes. When the pool runs dry, the most recently admitted request is
preempted: its blocks are released and it is recomputed later (its full blocks usually survive in
the prefix cache, so the recompute is cheap). The scheduler never touches tensors.

Steps are pipelined: step N+1 is scheduled while step N runs on the device. A token sampled by
step N is a PLACEHOLDER in the request until its value arrives (the model runner feeds it to step
N+1 straight from device memory); stops that depend on the value (EOS, stop ids, stop strings) are
applied when it arrives, so a stopping request may compute one token that is never delivered.
"""

from collections import deque
from dataclasses import dataclass, field

from pagedllm.config import SchedulerConfig
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import PLACEHOLDER, Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int                    # position of the first token computed this step
    samples: bool                 # this step reaches the last token, so the next one is sampled
    output_index: int = -1        # where the sampled token goes in output_token_ids (set at launch)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_prompt_tokens: int = 0    # prompt tokens computed this step (a recompute counts again)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

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
        out = SchedulerOutput()
        scheduled = out.scheduled
        allocate_slots = self.kv_cache.allocate_slots
        budget = self.config.max_num_batched_tokens
        index = 0
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
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new, start,
                                                  start + num_new == num_prompt + num_outputs))
                if start < num_prompt:
                    out.num_prompt_tokens += min(num_new, num_prompt - start)
                budget -= num_new
                index += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        block_size = self.kv_cache.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, num_cached,
                                                  num_cached + num_new == request.num_tokens))
            out.num_prompt_tokens += min(num_new, max(0, request.num_prompt_tokens - num_cached))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def on_launched(self, out: SchedulerOutput) -> None:
        """The step is running on the device: count its tokens as computed and reserve a
        placeholder for each token it samples, so the next step can be scheduled (with the
        placeholder as input) before the sampled values reach the host."""
        for item in out.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                request.output_token_ids.append(PLACEHOLDER)
                item.output_index = len(request.output_token_ids) - 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[tuple[Request, int]]:
        """Fill in the step's sampled tokens and finish requests that hit a token-level stop.
        Returns (request, token) for every request that got a new token."""
        advanced = []
        cache_blocks = self.kv_cache.cache_blocks
        for item in out.scheduled:
            request = item.request
            if not item.samples or request.is_finished:
                continue  # a prefill chunk, or finished/aborted while the step ran
            token = sampled[request.request_id]
            request.output_token_ids[item.output_index] = token
            cache_blocks(request)
            advanced.append((request, token))
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
        while request.output_token_ids and request.output_token_ids[-1] == PLACEHOLDER:
            request.output_token_ids.pop()   # a token sampled after the stop: never delivered
        return request
