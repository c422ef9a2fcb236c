"""Which engine core serves a request, with several of them (data parallelism).

Policies (`--routing`):
  prefix        the core holding the longest cached prefix of the prompt, unless that core is
                much busier than the least-loaded one or full (max_num_seqs unfinished) while it
                is not; no match: the least-loaded core, or, where
                several API processes route (`routers` > 1), the first core in the prompt's rendezvous
                order (a hash of its first block) that has at most HOME_SLACK more such new prompts
                unfinished than another, so that they all send a new system prompt to the same core
                while prompts that share nothing stay balanced.
  least-loaded  the core with the fewest unfinished sequences (then KV usage).
  round-robin   each core in turn.

What a core holds is known from the core itself: each core reports the chained block hashes its
KV cache manager caches and evicts (kv_cache.extend_block_hashes, which hashes prompts here too),
and the router adds the prompts it has sent there and not seen finish (their blocks are being
computed there). A prompt is hashed only as far as some core holds its blocks, plus one block: a
burst of new prompts, which no core holds yet, costs one hash each, not one a block. A core's load
is the larger of the sequences this front end sent there and has not seen finish, and the running
+ waiting sequences the core last reported: with several API processes each sees only its own
share, and a report lags the sends made since. Plain bookkeeping: no sockets, no clock.
"""

import hashlib
import itertools
from collections import Counter

from pagedllm.engine.kv_cache import extend_block_hashes

ROUTING_POLICIES = ("prefix", "least-loaded", "round-robin")
# the prefix policy leaves affinity for the least-loaded core when the preferred one has more
# than BALANCE_ABS and more than BALANCE_REL times as many unfinished sequences more than it
BALANCE_ABS = 32
BALANCE_REL = 0.5
# with shared cores, a prompt that no core holds skips a core in its rendezvous order that holds more
# than HOME_SLACK unfinished sequences placed that way more than another core: prompts without shared
# prefixes (each one new) would otherwise land by their hashes alone, unbalanced. Counting only such
# placements, not every sequence, keeps a system prompt's own burst from steering the next new prompt
# away from its first choice (benchmarks/routing_balance.py)
HOME_SLACK = 4


class Router:
    def __init__(self, num_cores: int, block_size: int, policy: str = "prefix", routers: int = 1,
                 capacity: int | None = None) -> None:
        """routers: how many routers (API processes, this one included) send to the same cores, each on
        its own; capacity: the sequences a core runs at once (max_num_seqs), None for no limit."""
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.routers = routers
        self.capacity = capacity
        self.block_size = block_size
        self.alive = [True] * num_cores
        self.cached: list[set[bytes]] = [set() for _ in range(num_cores)]   # reported by each core
        self.pending: list[Counter] = [Counter() for _ in range(num_cores)]  # prompts sent, not finished
        self.load = [0] * num_cores                  # unfinished sequences sent to each core
        self.new_load = [0] * num_cores              # ... of them placed as new prompts by rendezvous order
        self.reported = [0] * num_cores              # running + waiting, as each core last said
        self.kv_usage = [0.0] * num_cores
        self._sequences: dict[str, tuple[int, list[bytes], bool]] = {}   # id -> (core, prompt hashes, new)
        self._turn = itertools.cycle(range(num_cores))

    @property
    def num_cores(self) -> int:
        return len(self.alive)

    @property
    def shared(self) -> bool:
        """Other routers (API processes) send to the same cores, each on its own."""
        return self.routers > 1

    def route(self, sequence_ids: list[str], token_ids: list[int]) -> int:
        """Pick the core for a request's sequences (they share a prompt, so they go together) and
        record them there; raises RuntimeError when no core is left."""
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise RuntimeError("no engine core is running")
        hashes, matched = self._match(live, token_ids) if self.policy == "prefix" else ([], {})
        new = self.shared and bool(hashes) and max(matched.values(), default=0) == 0
        core = self._place_new(live, hashes[0]) if new else self._pick(live, matched)
        for sequence_id in sequence_ids:
            self._sequences[sequence_id] = (core, hashes, new)
            self.pending[core].update(hashes)
        self.load[core] += len(sequence_ids)
        self.new_load[core] += len(sequence_ids) if new else 0
        return core

    def _match(self, live: list[int], token_ids: list[int]) -> tuple[list[bytes], dict[int, int]]:
        """The prompt's leading block hashes, as far as any live core holds or computes them plus the
        first that none does (hashed in chunks that double), and how many of them each core has."""
        hashes: list[bytes] = []
        matched = dict.fromkeys(live, 0)
        holders = list(live)
        num_blocks = (len(token_ids) - 1) // self.block_size

        def tokens_in(start: int, end: int) -> list[int]:
            return token_ids[start:end]

        while holders and len(hashes) < num_blocks:
            first = len(hashes)
            extend_block_hashes(hashes, tokens_in, min(num_blocks, 2 * first + 1), self.block_size)
            for n in range(first, len(hashes)):
                holders = [i for i in holders if hashes[n] in self.cached[i] or self.pending[i][hashes[n]]]
                if not holders:
                    del hashes[n + 1:]
                    break
                for i in holders:
                    matched[i] = n + 1
        return hashes, matched

    def _pick(self, live: list[int], matched: dict[int, int]) -> int:
        if self.policy == "round-robin":
            return next(i for i in self._turn if self.alive[i])
        busy, least = self._busy(live)
        if not matched:
            return least
        best = max(live, key=lambda i: (matched[i], -busy[i], -self.kv_usage[i]))
        if matched[best] == 0:
            return least
        return self._guard(best, least, busy)

    def _place_new(self, live: list[int], first_block_hash: bytes) -> int:
        """A prompt no core holds, with shared cores: the first core in its rendezvous order within
        HOME_SLACK of the fewest new prompts, unless much busier than the least-loaded core."""
        fewest = min(self.new_load[i] for i in live)
        core = next(i for i in rendezvous_order(live, first_block_hash) if self.new_load[i] <= fewest + HOME_SLACK)
        busy, least = self._busy(live)
        return self._guard(core, least, busy)

    def _full(self, core: int) -> bool:
        """Whether the core has `capacity` unfinished sequences already, so that one more would wait for
        a slot: by what it last reported, or by this router's own sends times the number of routers
        (in a burst the reports lag, and each API process gets about an equal share of the requests)."""
        return self.capacity is not None and self._unfinished(core, self.routers) >= self.capacity

    def _unfinished(self, core: int, share: int = 1) -> int:
        """The core's unfinished sequences: the larger of this router's own sends (times `share`) and the
        running + waiting the core last reported."""
        return max(self.load[core] * share, self.reported[core])

    def _busy(self, live: list[int]) -> tuple[dict[int, int], int]:
        """Each live core's unfinished sequences as far as this router knows, and the least-loaded
        core (ties: the lower KV usage)."""
        busy = {i: self._unfinished(i) for i in live}
        return busy, min(live, key=lambda i: (busy[i], self.kv_usage[i]))

    def _guard(self, preferred: int, least: int, busy: dict[int, int]) -> int:
        """The preferred core unless it is full while the least-loaded one is not (a full core's new
        sequence waits for a whole sequence to finish there, which costs more than computing its prefix
        elsewhere), or it has over BALANCE_ABS and over BALANCE_REL times as many unfinished sequences
        more than the least-loaded one."""
        if self._full(preferred) and not self._full(least):
            return least
        excess = busy[preferred] - busy[least]
        return least if excess > BALANCE_ABS and excess > BALANCE_REL * busy[least] else preferred

    def core_of(self, sequence_id: str) -> int | None:
        entry = self._sequences.get(sequence_id)
        return entry[0] if entry is not None else None

    def finish(self, sequence_id: str) -> None:
        """The sequence ended (finished, aborted or failed); unknown ids are ignored."""
        entry = self._sequences.pop(sequence_id, None)
        if entry is None:
            return
        core, hashes, new = entry
        self.load[core] -= 1
        self.new_load[core] -= new
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
        lost = [s for s, (c, _, _) in self._sequences.items() if c == core]
        for sequence_id in lost:
            self.finish(sequence_id)
        return lost


def rendezvous_order(live: list[int], first_block_hash: bytes) -> list[int]:
    """The live cores in the order a prompt that no core holds prefers them when several routers
    share the cores: by the hash of the prompt's first block with each core's index, highest first
    (rendezvous hashing). Every API process computes the same order without talking to the others,
    so a burst of a new system prompt lands on one core instead of each process's least-loaded one;
    a lost core changes the first choice only of the prompts that put it first."""
    return sorted(live, key=lambda i: hashlib.blake2b(first_block_hash + i.to_bytes(4, "little"),
                                                       digest_size=8).digest(), reverse=True)
