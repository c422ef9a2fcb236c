"""One sequence's state as the scheduler and KV cache manager see it: tokens, progress, blocks."""

import enum
import time
from dataclasses import dataclass, field

from pagedllm.core_types import PLACEHOLDER, token_span
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISHED


# A tuple, not a set: membership is an identity check, where a set would call Enum's Python-level
# __hash__ (is_finished runs for every request at every step).
_FINISHED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False, slots=True)
class Request:
    """A single sequence. A user request with n > 1 becomes n of these sharing one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1         # prompt tokens served from the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    num_blocks_sent: int = -1           # block ids the worker has; -1: it must read the request whole
    scheduled_time: float | None = None     # first admission (time.monotonic)
    grammar: object = None              # structured outputs: its grammar state (ready() when compiled)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values are on the host (all but a trailing placeholder)."""
        pending = 1 if self.output_token_ids and self.output_token_ids[-1] == PLACEHOLDER else 0
        return self.num_tokens - pending

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def tokens_in(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without concatenating the whole sequence."""
        return token_span(self.prompt_token_ids, self.output_token_ids, start, end)
