"""Plain data that crosses the seams, below every layer that uses it (no torch, no engine classes).

    front end --EngineCoreRequest--> engine core --SchedulerOutput--> executor / worker
    front end <--EngineCoreOutputs-- engine core <--ModelRunnerOutput-- executor / worker

The scheduler's output is a diff: a request's prompt, parameters and blocks go to the worker once
(`NewRequestData`); afterwards only its new blocks and how many tokens it computes this step. The
worker keeps its own copy of each running request (its sampled tokens included).

The messages between the front end and the engine core process are msgspec Structs, encoded by
engine/serial.py; a step's outputs for all of a client's requests travel as one message of arrays.
"""

from typing import Any

import msgspec

from pagedllm.sampling_params import SamplingParams

PLACEHOLDER = -1   # a sampled token whose value has not reached the host yet


def token_span(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return output[start - n:end - n]
    return prompt[start:] + output[:end - n]


# (logprob of the token, its rank, top-N ids, top-N logprobs) at one position
LogprobEntry = tuple[float, int, list[int], list[float]]


class _Plain(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Compact msgpack arrays; these objects hold no reference cycles, so the GC skips them."""


# ---- scheduler -> executor -> worker ------------------------------------------------------------
class NewRequestData(_Plain):
    """A request the worker has not seen, or must forget and re-read (resumed after preemption)."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    output_token_ids: list[int] = []   # generated before a preemption; recomputed with the prompt


class SchedulerOutput(_Plain):
    request_ids: list[str] = []            # the step's batch, in order
    num_scheduled_tokens: list[int] = []   # tokens each computes this step
    num_computed_tokens: list[int] = []    # position of each one's first token this step
    new_requests: list[NewRequestData] = []
    new_block_ids: dict[str, list[int]] = {}   # blocks appended to known requests' tables
    finished_request_ids: list[str] = []   # ended since the last step: the worker drops them
    num_prompt_tokens: int = 0             # prompt tokens computed this step (a recompute counts again)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids


class ModelRunnerOutput(_Plain):
    request_ids: list[str] = []            # the requests that sampled a token, in batch order
    sampled_token_ids: list[int] = []
    logprobs: dict[str, LogprobEntry] = {}
    # request id -> (first prompt position scored, one entry per position)
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] = {}


# ---- front end <-> engine core ------------------------------------------------------------------
class EngineCoreRequest(_Plain):
    """One sequence (the front end fans a request with n > 1 out into n of these)."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    client_index: int = 0


class SchedulerStats(_Plain):
    """The core's state after a step; the counters are totals since start, so a message that is
    merged or skipped loses nothing."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    num_decode_steps: int = 0              # steps that sampled at least one token
    step_time: float = 0.0                 # seconds spent in steps
    structured_requests: int = 0           # sequences under a grammar
    grammar_compile_time: float = 0.0      # seconds spent compiling grammars (in a thread pool)
    grammar_mask_time: float = 0.0         # seconds spent advancing matchers and filling token bitmasks (in the step loop)


class UtilityResult(_Plain):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreOutputs(_Plain):
    """One step's results for one client, as arrays over its requests."""
    request_ids: list[str] = []            # requests with a new token this step
    new_token_ids: list[int] = []
    finished: dict[str, tuple[str, str | int | None]] = {}   # id -> (finish reason, stop reason)
    logprobs: dict[str, LogprobEntry] = {}
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] = {}
    num_cached_tokens: dict[str, int] = {}     # with a request's first token
    queue_time: dict[str, float] = {}          # with a request's first token: arrival to first scheduled
    errors: dict[str, str] = {}                # sequences the core gave up on (aborted there), and why
    # with several cores (data parallel): the prefix-block hashes this core cached / evicted since
    # its last message, for the front ends' prefix-aware routing
    blocks_cached: list[bytes] = []
    blocks_evicted: list[bytes] = []
    scheduler_stats: SchedulerStats | None = None
    utility_results: list[UtilityResult] = []
    engine_info: dict | None = None        # the core's first message: it is ready
    dead: str | None = None                # the core's last message: why it stops ("ValueError: ...")
    timestamp: float = 0.0
    engine_index: int = 0                  # which core sent it (set by the front end that received it)


# the front end's messages to the core
class AddRequests(_Plain, tag="add"):
    requests: list[EngineCoreRequest]


class AbortRequests(_Plain, tag="abort"):
    request_ids: list[str]


class UtilityCall(_Plain, tag="utility"):
    client_index: int
    call_id: int
    method: str
    args: list = []


class Shutdown(_Plain, tag="shutdown"):
    pass


CoreInput = AddRequests | AbortRequests | UtilityCall | Shutdown
