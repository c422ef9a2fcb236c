"""The worker's own copy of every running request, kept up to date from the scheduler's diffs.

A request arrives whole once (NewRequestData: prompt, parameters, blocks; again after a
preemption), then each step adds only its new blocks. Its output tokens are the worker's own: a
token sampled by a step is a PLACEHOLDER until the step's results are read on the host (the next
step takes its value from device memory meanwhile). Ended requests are dropped with the next step.
"""

from dataclasses import dataclass, field

import torch

from pagedllm.core_types import PLACEHOLDER, NewRequestData, SchedulerOutput, token_span
from pagedllm.sampling_params import SamplingParams


@dataclass(eq=False, slots=True)
class CachedRequestState:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None      # seeded sampling: survives preemption
    prev_row: int = -1           # row of the previous step's samples holding a trailing PLACEHOLDER

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        if position < num_prompt:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - num_prompt]

    def tokens_in(self, start: int, end: int) -> list[int]:
        return token_span(self.prompt_token_ids, self.output_token_ids, start, end)

    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PLACEHOLDER


@dataclass
class InputBatch:
    requests: dict[str, CachedRequestState] = field(default_factory=dict)

    def apply(self, out: SchedulerOutput) -> list[CachedRequestState]:
        """Apply the step's diff; returns the step's requests in batch order."""
        requests = self.requests
        for request_id in out.finished_request_ids:
            requests.pop(request_id, None)
        for new in out.new_requests:
            requests[new.request_id] = _state(new, requests.get(new.request_id))
        for request_id, blocks in out.new_block_ids.items():
            requests[request_id].block_ids.extend(blocks)
        return [requests[request_id] for request_id in out.request_ids]


def _state(new: NewRequestData, old: CachedRequestState | None) -> CachedRequestState:
    return CachedRequestState(new.request_id, new.prompt_token_ids, new.sampling_params, list(new.block_ids),
                              list(new.output_token_ids), old.generator if old is not None else None)
