"""A read-only, bounded, JSON-able picture of the engine for the live dashboard.

`engine_snapshot(core)` must run where nothing else mutates the engine core: between two of its
steps (EngineCore.snapshot is a named call, which the core runs there). It never copies prompt or
output tokens (they may be private), only counts.

Block states, one character per block (or per cell of `cell_size` blocks for large pools, showing
the state most of the cell's blocks are in), base 36:
  "0" free, "1" cached-and-free (holds a reusable prefix block), "2" in use by several requests
  (a shared prefix block), "3".."i" in use by one request, whose colour is the digit minus 3 (the
  same colour index that the request's row carries).
The Python-level cost is per request (not per block): block ids are gathered from each request's
`block_ids`, and the pool is painted with numpy (the pool keeps a `hashed` bytearray of its cached
blocks); the request rows are bounded by MAX_LISTED. See benchmarks/dashboard_snapshot_cost.py.
"""

import time
from collections import deque

import numpy as np

FREE, CACHED, SHARED, FIRST_COLOUR = 0, 1, 2, 3
NUM_COLOURS = 16
MAX_CELLS = 4096
MAX_LISTED = 64          # rows of the running and of the waiting table
_DIGITS = bytes.maketrans(bytes(range(36)), b"0123456789abcdefghijklmnopqrstuvwxyz")


class ColourBook:
    """Each request's colour on the dashboard, kept from poll to poll: a new request takes a colour
    no live request has, the one freed longest ago, so up to NUM_COLOURS requests at once never
    share one (beyond that, the least-used colour is shared). The n sequences of a request share
    their parent's colour."""

    def __init__(self, num_colours: int = NUM_COLOURS) -> None:
        self.of: dict[str, int] = {}           # parent request id -> colour
        self.holders = [0] * num_colours
        self.free = deque(range(num_colours))  # colours no request has, freed longest ago first

    def update(self, request_ids) -> None:
        """The live requests now (in arrival order): free the colours of those gone, colour the new."""
        live = dict.fromkeys(r.split("#", 1)[0] for r in request_ids)
        for parent in [p for p in self.of if p not in live]:
            colour = self.of.pop(parent)
            self.holders[colour] -= 1
            if self.holders[colour] == 0:
                self.free.append(colour)
        for parent in live:
            if parent not in self.of:
                colour = self.free.popleft() if self.free else min(range(len(self.holders)),
                                                                   key=self.holders.__getitem__)
                self.of[parent] = colour
                self.holders[colour] += 1

    def colour(self, request_id: str) -> int:
        return self.of[request_id.split("#", 1)[0]]


def block_states(kv_cache, requests: dict, colours: ColourBook, max_cells: int = MAX_CELLS,
                 id_cache: dict | None = None) -> tuple[str, int]:
    """(states string, cell_size): see the module docstring. `requests` maps request id -> Request
    (the scheduler's), whose `block_ids` mirror the manager's block lists as plain ints; `colours`
    knows every one of them. `id_cache` (a dict kept by the caller across calls) holds each request's
    block ids as an array, so a repeated snapshot only converts the blocks added since the last one."""
    pool = kv_cache.pool
    n = len(pool.hashed)
    states = np.frombuffer(bytes(pool.hashed), dtype=np.uint8).copy()   # 0 free, 1 cached
    arrays, palette = [], []
    for request_id, blocks in kv_cache.block_lists().items():
        ids = _ids(request_id, requests[request_id].block_ids, id_cache)
        arrays.append(ids)
        palette.append(FIRST_COLOUR + colours.colour(request_id))
    if id_cache is not None and len(id_cache) > len(arrays):
        for request_id in [r for r in id_cache if r not in kv_cache.block_lists()]:
            del id_cache[request_id]
    if arrays:
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays)
        states[flat] = np.repeat(np.array(palette, dtype=np.uint8), lengths)
        states[np.bincount(flat, minlength=n) > 1] = SHARED   # a prefix block several requests hold
    if n <= max_cells:
        return states.tobytes().translate(_DIGITS).decode("ascii"), 1
    return _group(states, n, max_cells), -(-n // max_cells)


def _ids(request_id: str, ids: list[int], cache: dict | None) -> np.ndarray:
    if cache is None:
        return np.array(ids, dtype=np.int64)
    hit = cache.get(request_id)
    if hit is not None and hit[0] is ids and hit[1] <= len(ids):   # same list, only appended to
        arr = hit[2]
        if hit[1] < len(ids):
            arr = np.concatenate([arr, np.array(ids[hit[1]:], dtype=np.int64)])
    else:
        arr = np.array(ids, dtype=np.int64)
    cache[request_id] = (ids, len(ids), arr)
    return arr


def _group(states: np.ndarray, n: int, max_cells: int) -> str:
    """One state per cell of `size` consecutive blocks: the state most of them are in (free,
    cached, in use; ties go to the earlier); an in-use cell shows its highest colour state."""
    size = -(-n // max_cells)
    cells = -(-n // size)
    arr = np.zeros(cells * size, dtype=np.uint8)     # the last cell's padding counts as free
    arr[:n] = states
    arr = arr.reshape(cells, size)
    free = np.zeros(cells, dtype=np.uint16)
    cached = np.zeros(cells, dtype=np.uint16)
    top = np.zeros(cells, dtype=np.uint8)
    for k in range(size):         # column by column: much faster than reducing a short inner axis
        col = arr[:, k]
        free += col == FREE
        cached += col == CACHED
        np.maximum(top, col, out=top)
    used = size - free - cached
    out = np.where((used > free) & (used > cached), top, (cached > free).astype(np.uint8))
    return out.astype(np.uint8).tobytes().translate(_DIGITS).decode("ascii")


def _row(request, colours: ColourBook) -> dict:
    return {
        "id": request.request_id,
        "colour": colours.colour(request.request_id),
        "prompt_tokens": request.num_prompt_tokens,
        "generated_tokens": request.num_known_tokens - request.num_prompt_tokens,
        "computed_tokens": request.num_computed_tokens,
        "cached_tokens": max(0, request.num_cached_tokens),
        "blocks": len(request.block_ids),
        "preemptions": request.num_preemptions,
        "age_s": round(time.monotonic() - request.arrival_time, 2),
    }


def engine_snapshot(core, colours: ColourBook, max_cells: int = MAX_CELLS, id_cache: dict | None = None) -> dict:
    """The dashboard's view of an EngineCore (see the module docstring for the block states). Pass
    the same `colours` and `id_cache` to repeated calls on one engine: colours stay put, and the
    calls are cheaper."""
    kv = core.kv_cache
    scheduler = core.scheduler
    running, waiting = scheduler.running, scheduler.waiting
    colours.update([r.request_id for r in running] + [r.request_id for r in waiting])   # running first
    states, cell_size = block_states(kv, scheduler.requests, colours, max_cells, id_cache)
    model = core.config.model
    capacity = dict(core.executor.capacity)
    capacity.update(max_model_len=model.max_model_len, block_size=kv.block_size, num_blocks=kv.num_blocks,
                    dtype=model.dtype, prefix_caching=kv.enable_prefix_caching,
                    max_num_seqs=scheduler.config.max_num_seqs,
                    max_num_batched_tokens=scheduler.config.max_num_batched_tokens)
    num_free = kv.num_free_blocks
    counters = {
        "time": time.monotonic(),
        "prompt_tokens": core.prompt_tokens,
        "generation_tokens": core.generation_tokens,
        "prefix_cache_queries": kv.prefix_cache_queries,
        "prefix_cache_hits": kv.prefix_cache_hits,
        "preemptions": scheduler.num_preemptions,
        "finished": sum(core.finished.values()),
        "num_running": len(running),
        "num_waiting": len(waiting),
        "kv_usage": 1.0 - num_free / kv.num_blocks,
        "blocks_in_use": kv.num_blocks - num_free,
        "blocks_cached": len(kv.pool.cached),
        "steps": core.num_steps,
        "step_time": core.step_time,
        "structured_requests": core.structured.num_requests,
        "grammar_compile_time": core.structured.compile_time,
    }
    return {
        "blocks": {"states": states, "cell_size": cell_size, "num_blocks": kv.num_blocks,
                   "num_colours": NUM_COLOURS},
        "running": [_row(r, colours) for r in running[:MAX_LISTED]],
        "waiting": [_row(r, colours) for r in _head(waiting, MAX_LISTED)],
        "counters": counters,
        "kv": capacity,
    }


def _head(queue, n: int):
    for i, item in enumerate(queue):
        if i >= n:
            return
        yield item
