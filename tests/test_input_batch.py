"""The worker's persistent block tables (worker/input_batch.py): one row per request, written from
the scheduler's diffs, must always read back as each request's own block list, zero-padded."""

import random

import numpy as np

from pagedllm.core_types import NewRequestData, SchedulerOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import InputBatch

PARAMS = SamplingParams(max_tokens=4)


def _expected(states) -> np.ndarray:
    width = max(len(s.block_ids) for s in states)
    return np.array([s.block_ids + [0] * (width - len(s.block_ids)) for s in states], dtype=np.int32)


def test_tables_follow_the_diffs_through_growth_reuse_and_preemption():
    rng = random.Random(0)
    batch = InputBatch(max_blocks_per_request=12, rows=2)   # starts small: rows must be added
    blocks = {}                                             # request id -> its block list, as sent
    next_block = iter(range(1, 10_000))
    for step in range(60):
        new, grown = [], {}
        finished = [r for r in blocks if rng.random() < 0.15]
        for request_id in finished:
            del blocks[request_id]
        for i in range(rng.randint(0, 3)):
            request_id = f"{step}-{i}"
            blocks[request_id] = [next(next_block) for _ in range(rng.randint(1, 4))]
            new.append(NewRequestData(request_id, [1, 2, 3], PARAMS, list(blocks[request_id])))
        for request_id in blocks:
            if all(request_id != n.request_id for n in new) and rng.random() < 0.3:
                if len(blocks[request_id]) > 6 and rng.random() < 0.3:   # preempted, then sent again
                    blocks[request_id] = [next(next_block) for _ in range(2)]
                    new.append(NewRequestData(request_id, [1, 2, 3], PARAMS, list(blocks[request_id])))
                elif len(blocks[request_id]) < 12:
                    more = [next(next_block) for _ in range(rng.randint(1, 12 - len(blocks[request_id])))]
                    blocks[request_id] += more
                    grown[request_id] = more
        ids = list(blocks)
        rng.shuffle(ids)
        out = SchedulerOutput(request_ids=ids, num_scheduled_tokens=[1] * len(ids), num_computed_tokens=[0] * len(ids),
                              new_requests=new, new_block_ids=grown, finished_request_ids=finished)
        states = batch.apply(out)
        assert [s.block_ids for s in states] == [blocks[r] for r in ids]
        if states:
            assert np.array_equal(batch.block_table(states), _expected(states))
        rows = [s.table_row for s in batch.requests.values()]
        assert len(set(rows)) == len(rows)                    # no two requests share a row
    assert len(batch.tables) > 2
