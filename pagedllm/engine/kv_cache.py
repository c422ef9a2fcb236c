"""The paged KV cache's bookkeeping: block pool, per-request block tables, prefix caching.

No tensors live here: the model runner owns the pool's memory and this module only decides which
block ids each request uses. Every block is in exactly one state:
  free            ref_count == 0, no hash, in the free queue
  cached-and-free ref_count == 0, holds a full prefix block (has a hash), in the free queue
  in use          ref_count >= 1, not in the free queue (possibly shared by several requests)
Free blocks are handed out least-recently-freed first, so cached prefix blocks survive as long
as the pool allows (LRU eviction).
"""

import hashlib
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pagedllm.engine.request import Request


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None   # kept to reject hash collisions on lookup


def _packed(token_ids: list[int]) -> memoryview:
    """Token ids as little-endian int64 bytes: half the cost of formatting them as text."""
    ids = array("q", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return memoryview(ids).cast("B")


def _chained(parent_hash: bytes | None, packed_block) -> bytes:
    """Chained content hash: a block is identified by its tokens (as little-endian int64s) and
    everything before them."""
    h = hashlib.blake2b(parent_hash or b"\0", digest_size=16)
    h.update(packed_block)
    return h.digest()


def extend_block_hashes(hashes: list[bytes], tokens_in, num_full_blocks: int, block_size: int) -> None:
    """Append the chained hashes of full blocks len(hashes)..num_full_blocks - 1, whose tokens
    tokens_in(start, end) gives: the one rule for a block's identity (the router uses it too). The
    new blocks' tokens are packed at once (a 1,024-token prompt is 64 blocks on the engine's thread)."""
    first = len(hashes)
    if first >= num_full_blocks:
        return
    packed = _packed(tokens_in(first * block_size, num_full_blocks * block_size))
    width = 8 * block_size
    for i in range(num_full_blocks - first):
        hashes.append(_chained(hashes[-1] if hashes else None, packed[i * width:(i + 1) * width]))


class BlockPool:
    """Fixed set of blocks with ref counts, an LRU free queue and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.hashed = bytearray(num_blocks)   # 1 where the block holds a cached prefix (read by snapshots)
        self.events: dict[bytes, bool] | None = None   # hash -> cached now? (since take_events), when recorded

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[Block]:
        assert count <= self.num_free, "caller must check capacity first"
        out = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on (possibly free) cached blocks that a new request reuses."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[Block]) -> None:
        """Drop references; unreferenced cached blocks stay reusable, the rest are recycled first."""
        for block in blocks:
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: bytes, token_ids: list[int]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def register(self, block: Block, block_hash: bytes, token_ids: list[int]) -> None:
        if block.block_hash is not None or block_hash in self.cached:
            return  # already cached, or an identical block is: keep the first
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        self.hashed[block.block_id] = 1
        if self.events is not None:
            self.events[block_hash] = True

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            if self.events is not None:
                self.events[block.block_hash] = False
            block.block_hash = None
            block.token_ids = None
            self.hashed[block.block_id] = 0

    def reset_prefix_cache(self) -> None:
        for block in self.free_queue.values():
            self._evict(block)

    def take_events(self) -> tuple[list[bytes], list[bytes]]:
        """The hashes cached and those evicted since the last call (each hash's last change only),
        once record_events() has started recording."""
        events = self.events
        if not events:
            return [], []
        self.events = {}
        return [h for h, cached in events.items() if cached], [h for h, cached in events.items() if not cached]

    def record_events(self) -> None:
        """Record which hashes are cached and evicted (front ends route requests by them)."""
        if self.events is None:
            self.events = {}

    def check_invariants(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self.free_queue
            assert (block.ref_count == 0) == in_free, f"block {block.block_id} ref/free mismatch"
            assert block.ref_count >= 0
            if block.block_hash is not None:
                assert self.cached[block.block_hash] is block
            assert self.hashed[block.block_id] == (block.block_hash is not None)
        assert all(b.block_hash == h for h, b in self.cached.items())


class KVCacheManager:
    """Gives requests blocks on demand, shares cached prefix blocks, and counts prefix-cache hits."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[Block]] = {}
        self._num_registered: dict[str, int] = {}
        self.prefix_cache_queries = 0   # prompt tokens looked up
        self.prefix_cache_hits = 0      # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def block_lists(self) -> dict[str, list[Block]]:
        """Request id -> the blocks it holds (read-only: for snapshots)."""
        return self._blocks

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(request.block_hashes, request.tokens_in, request.num_known_tokens // self.block_size,
                            self.block_size)

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of leading full blocks already in the cache (never the whole prompt:
        the last token must be computed to produce logits)."""
        first_admission = request.num_cached_tokens < 0
        hits: list[Block] = []
        if self.enable_prefix_caching and not request.needs_prompt_logprobs:
            self._update_hashes(request)
            max_blocks = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
            for i in range(max_blocks):
                block = self.pool.lookup(request.block_hashes[i],
                                         request.tokens_in(i * self.block_size, (i + 1) * self.block_size))
                if block is None:
                    break
                hits.append(block)
        if first_admission and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_prompt_tokens
            self.prefix_cache_hits += min(len(hits) * self.block_size, request.num_prompt_tokens)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Make the request's block table cover its computed tokens (incl. `cached` blocks, which
        the caller then counts as computed) plus num_new_tokens. False (nothing changed) if the
        pool is too small."""
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        if not cached and total <= len(request.block_ids) * self.block_size:
            # the common decode step: the last block still has room (block_ids mirrors _blocks)
            if self.enable_prefix_caching and total % self.block_size == 0:
                self._register_full_blocks(request, self._blocks[request.request_id], total)
            return True
        blocks = self._blocks.setdefault(request.request_id, [])
        needed = -(-total // self.block_size) - len(blocks) - len(cached)
        reclaimable = sum(1 for b in cached if b.ref_count == 0)
        if needed > self.pool.num_free - reclaimable:
            if not blocks:
                del self._blocks[request.request_id]
            return False
        self.pool.touch(list(cached))
        new_blocks = list(cached) + (self.pool.allocate(needed) if needed > 0 else [])
        if new_blocks:
            blocks.extend(new_blocks)
            request.block_ids.extend(b.block_id for b in new_blocks)
        if self.enable_prefix_caching:
            self._register_full_blocks(request, blocks, total)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Publish the request's full, computed blocks whose tokens are now all known."""
        if (not self.enable_prefix_caching or request.num_computed_tokens // self.block_size
                <= self._num_registered.get(request.request_id, 0)):
            return   # every step but one in block_size: no block has filled up
        blocks = self._blocks.get(request.request_id)
        if blocks:
            self._register_full_blocks(request, blocks, request.num_computed_tokens)

    def _register_full_blocks(self, request: Request, blocks: list[Block], num_computed: int) -> None:
        """Publish full blocks up to num_computed whose token values are known (their K/V is
        written by a step already issued to the device, ahead of any later reader)."""
        self._update_hashes(request)
        start = self._num_registered.get(request.request_id, 0)
        end = min(num_computed // self.block_size, len(request.block_hashes), len(blocks))
        bs = self.block_size
        for i in range(start, end):
            self.pool.register(blocks[i], request.block_hashes[i], request.tokens_in(i * bs, (i + 1) * bs))
        self._num_registered[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Release all of the request's blocks; tail blocks go back first so they are evicted first."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        self.pool.release(list(reversed(blocks)))
        request.block_ids = []

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
