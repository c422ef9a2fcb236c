"""Data-parallel routing, as plain bookkeeping: the block-hash events a KV cache reports, and the
router's choices (prefix affinity, the load guard, least-loaded, round-robin, a lost core)."""

import random

import pytest

from pagedllm.engine.kv_cache import BlockPool, KVCacheManager, extend_block_hashes
from pagedllm.engine.request import Request
from pagedllm.engine.router import BALANCE_ABS, HOME_SLACK, Router, rendezvous_order
from pagedllm.sampling_params import SamplingParams

BS = 4


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """Every full block's chained hash that a core could reuse (never the last token's block)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, lambda start, end: token_ids[start:end], (len(token_ids) - 1) // block_size,
                        block_size)
    return hashes


def test_pool_reports_the_last_change_of_each_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.take_events() == ([], [])          # nothing is recorded until asked
    pool.record_events()
    pool.register(a, b"h-a", [1])
    pool.register(b, b"h-b", [2])
    pool.release([a, b])
    pool.allocate(1)                                # evicts a (least recently freed)
    assert pool.take_events() == ([b"h-b"], [b"h-a"])   # a's last change: evicted
    pool.reset_prefix_cache()
    assert pool.take_events() == ([], [b"h-b"])
    assert pool.take_events() == ([], [])


def test_manager_hashes_are_the_routers():
    """What a core reports is what the router computes from the prompt: the same chained hashes."""
    kv = KVCacheManager(8, BS)
    kv.pool.record_events()
    prompt = list(range(11))
    request = Request("r", prompt, SamplingParams(), max_tokens=4)
    assert kv.allocate_slots(request, len(prompt), kv.find_cached_prefix(request))
    cached, _ = kv.pool.take_events()
    assert set(cached) == set(prompt_block_hashes(prompt, BS)) and len(cached) == 2


def _router(policy="prefix", cores=2) -> Router:
    return Router(cores, BS, policy)


def test_prefix_affinity_follows_reported_and_pending_blocks():
    router = _router()
    shared = list(range(100, 112))
    first = router.route(["a"], shared + [1, 2])
    assert router.route(["b"], shared + [3, 4]) == first            # pending: the first is computing it
    other = router.route(["c"], list(range(200, 214)))
    assert other != first                                              # no match: the least-loaded core
    for s in "ab":
        router.finish(s)
    assert router.pending[first] == {}
    router.observe(first, prompt_block_hashes(shared + [0], BS), [], 0.1)
    assert router.route(["d"], shared + [5, 6]) == first              # reported by the core
    router.observe(first, [], prompt_block_hashes(shared + [0], BS), None)
    router.finish("d")
    assert not router.cached[first] and not router.pending[first]


def test_prompts_are_hashed_only_as_far_as_a_core_holds_them():
    """A prompt no core holds costs one block hash; one that follows a pending or reported prefix,
    that prefix and one block more; each list is the start of the prompt's full list of hashes."""
    router = _router()
    shared = list(range(300, 340))                          # 10 blocks
    prompts = {"a": shared + [1, 2, 3, 4, 5], "b": shared + [6, 7, 8, 9, 10], "c": list(range(500, 545))}
    recorded = {}
    for name, prompt in prompts.items():
        router.route([name], prompt)
        recorded[name] = router._sequences[name][1]
        assert recorded[name] == prompt_block_hashes(prompt, BS)[:len(recorded[name])]
    assert [len(recorded[name]) for name in "abc"] == [1, 2, 1]   # b matches a's pending first block
    router.observe(router.core_of("a"), prompt_block_hashes(prompts["a"], BS), [], None)
    router.route(["d"], shared + [11, 12, 13, 14, 15])
    assert len(router._sequences["d"][1]) == 11 and router.core_of("d") == router.core_of("a")


def test_affinity_yields_to_a_much_less_loaded_core():
    router = _router()
    shared = list(range(50, 70))
    hot = router.route(["s0"], shared)
    for i in range(1, BALANCE_ABS + 1):
        assert router.route([f"s{i}"], shared) == hot
    assert router.route(["over"], shared) != hot        # BALANCE_ABS + 1 more than the idle core
    assert router.load == [BALANCE_ABS + 1, 1] if hot == 0 else [1, BALANCE_ABS + 1]


def test_affinity_yields_when_its_core_is_full_and_another_is_not():
    """A full core (capacity = max_num_seqs unfinished) would make the next sequence wait for a slot
    while the other core could start it now: the prefix goes there too. A router sharing the cores with
    another counts its own sends twice (the other gets about as many), or the core's own report."""
    shared = list(range(50, 70))
    for routers, own_to_fill in ((1, 4), (2, 2)):
        router = Router(2, BS, "prefix", routers=routers, capacity=4)
        router.observe(0, prompt_block_hashes(shared + [0], BS), [], None)     # core 0 holds the prefix
        assert [router.route([f"s{i}"], shared) for i in range(own_to_fill + 1)] == [0] * own_to_fill + [1]
    reported = Router(2, BS, "prefix", capacity=4)
    reported.observe(0, prompt_block_hashes(shared + [0], BS), [], None, 4)
    assert reported.route(["r"], shared) == 1
    reported.observe(1, [], [], None, 4)                 # both full: affinity again
    assert reported.route(["q"], shared) == 0


def test_n_sequences_go_together_and_count_as_load():
    router = _router("least-loaded")
    core = router.route(["r-0", "r-1", "r-2"], [1, 2, 3])
    assert router.load[core] == 3 and {router.core_of(f"r-{i}") for i in range(3)} == {core}
    assert router.route(["x"], [1, 2, 3]) != core
    router.finish("r-0")
    router.finish("r-0")                                # idempotent
    assert router.load[core] == 2


def test_load_counts_what_the_core_reports_from_other_front_ends():
    """With several API processes each router sends only its share: a core reporting 40 running and
    waiting sequences is busier than this router's own count of 0 says, until it reports fewer; and
    affinity yields to that load as to its own."""
    router = _router("least-loaded")
    router.observe(0, [], [], None, 40)
    assert {router.route([f"a{i}"], [i]) for i in range(21)} == {1}     # 21 sent there: fewer than 40
    router.observe(0, [], [], None, 0)
    assert router.route(["b"], [7]) == 0
    shared = list(range(50, 70))
    for queued, expected in ((BALANCE_ABS + 10, 0), (2, 1)):
        prefix = _router()
        prefix.observe(1, prompt_block_hashes(shared + [0], BS), [], None, queued)   # core 1 holds the prefix
        assert prefix.route(["p"], shared) == expected


def _burst(routers: list[Router], prompts: dict[str, list[int]], per_prompt: int) -> dict[str, set[int]]:
    """Requests of each system prompt, shuffled, dealt to the routers in turn (as the kernel spreads
    connections over API processes), with no core report in between; the cores each prompt went to."""
    order = [name for name in prompts for _ in range(per_prompt)]
    random.Random(0).shuffle(order)
    cores: dict[str, set[int]] = {name: set() for name in prompts}
    for i, name in enumerate(order):
        cores[name].add(routers[i % len(routers)].route([str(i)], prompts[name] + [i]))
    return cores


def test_routers_sharing_the_cores_agree_on_a_new_prompts_core():
    """Two API processes route a burst on their own: each alone would send a new system prompt to its
    own least-loaded core, splitting some prompts over both cores; shared, they place every prompt by
    its rendezvous order (and both cores get prompts)."""
    prompts = {f"p{k}": list(range(1000 * k, 1000 * k + 24)) for k in range(8)}
    apart = _burst([_router(), _router()], prompts, 12)
    assert any(len(cores) > 1 for cores in apart.values())
    together = _burst([Router(2, BS, "prefix", routers=2) for _ in range(2)], prompts, 12)
    assert all(len(cores) == 1 for cores in together.values())
    assert set().union(*together.values()) == {0, 1}


def test_shared_routers_keep_unrelated_prompts_balanced():
    """Prompts without shared prefixes are each new: by their hashes alone they would spread unevenly;
    a core more than HOME_SLACK busier than the least-loaded is skipped, in each router's own count."""
    routers = [Router(2, BS, "prefix", routers=2) for _ in range(2)]
    counts = [0, 0]
    for i in range(200):
        counts[routers[i % 2].route([str(i)], [7 * i + j for j in range(BS + 1)])] += 1
    assert abs(counts[0] - counts[1]) <= 2 * (HOME_SLACK + 1)


def test_a_lost_core_moves_only_the_prompts_it_was_home_to():
    first_blocks = [prompt_block_hashes(list(range(k, k + 5)), BS)[0] for k in range(40)]
    before = [rendezvous_order([0, 1, 2], h)[0] for h in first_blocks]
    after = [rendezvous_order([1, 2], h)[0] for h in first_blocks]
    assert set(before) == {0, 1, 2}
    assert all(a == b for a, b in zip(after, before) if b != 0) and set(after) == {1, 2}


def test_round_robin_and_a_lost_core():
    router = _router("round-robin", cores=3)
    assert [router.route([str(i)], [i]) for i in range(4)] == [0, 1, 2, 0]
    assert sorted(router.lose(0)) == ["0", "3"]
    assert router.load[0] == 0 and router.core_of("3") is None
    assert {router.route([f"n{i}"], [i]) for i in range(4)} == {1, 2}
    router.lose(1)
    router.lose(2)
    with pytest.raises(RuntimeError, match="no engine core"):
        router.route(["z"], [1])


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing must be one of prefix, least-loaded, round-robin"):
        Router(2, BS, "random")
