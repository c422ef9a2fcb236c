"""Block pool and KV cache manager invariants: states, ref counts, prefix hits, LRU eviction."""

from pagedllm.engine.kv_cache import BlockPool, KVCacheManager, extend_block_hashes
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """The chained hash of one block of token_ids after a block whose hash is parent_hash (the rule
    extend_block_hashes applies to every full block of a prompt)."""
    hashes = [] if parent_hash is None else [parent_hash]
    extend_block_hashes(hashes, lambda start, end: token_ids, len(hashes) + 1, len(token_ids))
    return hashes[-1]


def req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), max_tokens=16)


def test_pool_states_and_lru_order():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.num_free == 2 and a.ref_count == 1
    pool.register(a, b"h-a", [1, 2])
    pool.release([b, a])
    pool.check_invariants()
    # b (no hash) is recycled before the untouched free blocks; cached a only after all of them
    order = [pool.allocate(1)[0].block_id for _ in range(4)]
    assert order[0] == b.block_id and order[-1] == a.block_id
    assert pool.lookup(b"h-a", [1, 2]) is None  # evicted when reallocated
    pool.check_invariants()


def test_lookup_rejects_collisions():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.register(block, b"same", [1, 2, 3])
    assert pool.lookup(b"same", [1, 2, 3]) is block
    assert pool.lookup(b"same", [1, 2, 4]) is None


def test_chained_hash_depends_on_parent():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0]), [1, 2])
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    assert hash_block(None, [12]) != hash_block(None, [1, 2])


def test_allocate_on_demand_and_free():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 10
    r.output_token_ids.append(99)
    assert kv.allocate_slots(r, 1)          # token 11 still fits block 3
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 11
    r.output_token_ids.append(98)
    assert kv.allocate_slots(r, 1)
    assert len(r.block_ids) == 3           # 12 tokens = 3 full blocks
    r.num_computed_tokens = 12
    r.output_token_ids.append(97)
    assert kv.allocate_slots(r, 1)
    assert len(r.block_ids) == 4
    kv.free(r)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    kv.pool.check_invariants()


def test_prefix_hits_share_blocks_and_count_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    first = req("a", prompt)
    assert kv.find_cached_prefix(first) == []
    assert kv.allocate_slots(first, 13)
    second = req("b", prompt[:12] + [77, 78])
    hits = kv.find_cached_prefix(second)
    assert [b.block_id for b in hits] == first.block_ids[:3]
    assert kv.allocate_slots(second, 14 - 12, hits)
    assert second.block_ids[:3] == first.block_ids[:3]
    assert all(kv.pool.blocks[i].ref_count == 2 for i in first.block_ids[:3])
    assert kv.prefix_cache_queries == 13 + 14 and kv.prefix_cache_hits == 12
    kv.free(first)
    kv.free(second)
    kv.pool.check_invariants()
    # freed blocks keep their contents: a third request still hits them
    third = req("c", prompt)
    assert len(kv.find_cached_prefix(third)) == 3


def test_full_prompt_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    b = req("b", list(range(8)))
    assert len(kv.find_cached_prefix(b)) == 1   # (8 - 1) // 4 blocks, never the whole prompt


def test_allocation_fails_cleanly_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    b = req("b", list(range(100, 105)))
    assert not kv.allocate_slots(b, 5)
    assert b.block_ids == [] and kv.num_free_blocks == 0
    kv.free(a)
    assert kv.allocate_slots(b, 5)
    kv.pool.check_invariants()


def test_prompt_logprob_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(9)))
    kv.allocate_slots(a, 9)
    b = req("b", list(range(9)), prompt_logprobs=1)
    assert kv.find_cached_prefix(b) == []
