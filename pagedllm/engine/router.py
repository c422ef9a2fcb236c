"""Which engine core serves a request, with several of them (data parallelism).

Policies (`--routing`):
  prefix        the core holding the longest cached prefix of the prompt, unless that core is
                much busier than the least-loaded one; no match: the least-loaded core.
  least-loaded  the core with the fewest unfinished sequences (then KV usage).
  round-robin   each core in turn.

What a core holds is known from the core itself: each core reports the chained block hashes its
KV cache manager caches and evicts (kv_cache.extend_block_hashes, which hashes prompts here too),
and the router adds the prompts it has sent there and not seen finish (their blocks are being
computed there). A core's load is the larger of the sequences this front end sent there and has
not seen finish, and the running + waiting sequences the core last reported: with several API
processes each sees only its own share, and a report lags the sends made since. Plain bookkeeping:
no sockets, no clock.
"""

import itertools
from collections import Counter

from pagedllm.engine.kv_cache import extend_block_hashes

ROUTING_POLICIES = ("prefix", "least-loaded", "round-robin")
# the prefix policy leaves affinity for the least-loaded core when the preferred one has more
# than BALANCE_ABS and more than BALANCE_REL times as many unfinished sequences more than it
BALANCE_ABS = 32
BALANCE_REL = 0.5


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The chained hashes of the prompt's full blocks that a core could reuse (never the last token)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, lambda start, end: token_ids[start:end], (len(token_ids) - 1) // block_size, block_size)
    return hashes


class Router:
    def __init__(self, num_cores: int, block_size: int, policy: str = "prefix") -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.alive = [True] * num_cores
        self.cached: list[set[bytes]] = [set() for _ in range(num_cores)]   # reported by each core
        self.pending: list[Counter] = [Counter() for _ in range(num_cores)]  # prompts sent, not finished
        self.load = [0] * num_cores                  # unfinished sequences sent to each core
        self.reported = [0] * num_cores              # running + waiting, as each core last said
        self.kv_usage = [0.0] * num_cores
        self._sequences: dict[str, tuple[int, list[bytes]]] = {}   # sequence id -> (core, prompt hashes)
        self._turn = itertools.cycle(range(num_cores))

    @property
    def num_cores(self) -> int:
        return len(self.alive)

    def route(self, sequence_ids: list[str], token_ids: list[int]) -> int:
        """Pick the core for a request's sequences (they share a prompt, so they go together) and
        record them there; raises RuntimeError when no core is left."""
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise RuntimeError("no engine core is running")
        hashes = prompt_block_hashes(token_ids, self.block_size) if self.policy == "prefix" else []
        core = self._pick(live, hashes)
        for sequence_id in sequence_ids:
            self._sequences[sequence_id] = (core, hashes)
            self.pending[core].update(hashes)
        self.load[core] += len(sequence_ids)
        return core

    def _pick(self, live: list[int], hashes: list[bytes]) -> int:
        if self.policy == "round-robin":
            return next(i for i in self._turn if self.alive[i])
        busy = {i: max(self.load[i], self.reported[i]) for i in live}
        least = min(live, key=lambda i: (busy[i], self.kv_usage[i]))
        if not hashes:
            return least
        matched = {i: self.matched_blocks(i, hashes) for i in live}
        best = max(live, key=lambda i: (matched[i], -busy[i], -self.kv_usage[i]))
        if matched[best] == 0:
            return least
        excess = busy[best] - busy[least]
        return least if excess > BALANCE_ABS and excess > BALANCE_REL * busy[least] else best

    def matched_blocks(self, core: int, hashes: list[bytes]) -> int:
        """How many leading blocks of the prompt the core holds or is computing."""
        cached, pending = self.cached[core], self.pending[core]
        for n, h in enumerate(hashes):
            if h not in cached and not pending[h]:
                return n
        return len(hashes)

    def core_of(self, sequence_id: str) -> int | None:
        entry = self._sequences.get(sequence_id)
        return entry[0] if entry is not None else None

    def finish(self, sequence_id: str) -> None:
        """The sequence ended (finished, aborted or failed); unknown ids are ignored."""
        entry = self._sequences.pop(sequence_id, None)
        if entry is None:
            return
        core, hashes = entry
        self.load[core] -= 1
        pending = self.pending[core]
        for h in hashes:
            pending[h] -= 1
            if not pending[h]:
                del pending[h]

    def observe(self, core: int, cached: list[bytes], evicted: list[bytes], kv_usage: float | None,
                queued: int | None = None) -> None:
        """A core's report: the block hashes it cached and evicted since its last one, its KV usage
        and its running + waiting sequences (None: not in this message)."""
        held = self.cached[core]
        held.update(cached)
        held.difference_update(evicted)
        if kv_usage is not None:
            self.kv_usage[core] = kv_usage
        if queued is not None:
            self.reported[core] = queued

    def lose(self, core: int) -> list[str]:
        """The core is gone: route nothing more there; returns its unfinished sequences (forgotten)."""
        self.alive[core] = False
        self.cached[core].clear()
        lost = [s for s, (c, _) in self._sequences.items() if c == core]
        for sequence_id in lost:
            self.finish(sequence_id)
        return lost
