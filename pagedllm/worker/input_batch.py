"""The worker's own copy of every running request, kept up to date from the scheduler's diffs.

A request arrives whole once (NewRequestData: prompt, parameters, blocks; again after a
preemption), then each step adds only its new blocks. Its output tokens are the worker's own: a
token sampled by a step is a PLACEHOLDER until the step's results are read on the host (the next
step takes its value from device memory meanwhile). Ended requests are dropped with the next step.

The block tables live in one preallocated array, a row per request, written as blocks arrive (a
request's whole table once, then only its new blocks): a step gathers its rows instead of
building a padded table from Python lists.
"""

from dataclasses import dataclass

import numpy as np
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
    table_row: int = -1          # its row of InputBatch.tables

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


class InputBatch:
    def __init__(self, max_blocks_per_request: int, rows: int = 64) -> None:
        self.requests: dict[str, CachedRequestState] = {}
        self.tables = np.zeros((rows, max_blocks_per_request), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))

    def apply(self, out: SchedulerOutput) -> list[CachedRequestState]:
        """Apply the step's diff; returns the step's requests in batch order."""
        requests = self.requests
        for request_id in out.finished_request_ids:
            self._drop(requests.pop(request_id, None))
        for new in out.new_requests:
            old = requests.get(new.request_id)
            state = requests[new.request_id] = _state(new, old)
            if old is None:
                state.table_row = self._take_row()
            else:   # sent again after a preemption: its table starts over
                state.table_row = old.table_row
                self.tables[state.table_row] = 0
            self.tables[state.table_row, :len(state.block_ids)] = state.block_ids
        for request_id, blocks in out.new_block_ids.items():
            state = requests[request_id]
            self.tables[state.table_row, len(state.block_ids):len(state.block_ids) + len(blocks)] = blocks
            state.block_ids.extend(blocks)
        return [requests[request_id] for request_id in out.request_ids]

    def block_table(self, requests: list[CachedRequestState]) -> np.ndarray:
        """The requests' block tables as one [len(requests), widest] int32 array (zero-padded)."""
        width = max(len(r.block_ids) for r in requests)
        return self.tables[[r.table_row for r in requests], :width]

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = len(self.tables)
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _drop(self, state: CachedRequestState | None) -> None:
        if state is not None:
            self.tables[state.table_row] = 0
            self._free_rows.append(state.table_row)


def _state(new: NewRequestData, old: CachedRequestState | None) -> CachedRequestState:
    return CachedRequestState(new.request_id, new.prompt_token_ids, new.sampling_params, list(new.block_ids),
                              list(new.output_token_ids), old.generator if old is not None else None)
