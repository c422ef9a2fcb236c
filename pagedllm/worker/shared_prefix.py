"""Cascade attention's host-side plan: which decoding sequences share a cached prefix.

Sequences that hit the same prefix-cache entry have block tables that start with the same block
ids. For a decode step, the attention backend can then read those shared blocks once per tile of
sequences instead of once per sequence (decode attention is bound by reading K/V: with 50 requests
on one 768-token system prompt, 3/4 of what each step reads is the same prefix, 50 times over).
The plan is built from the step's block-table array alone, so every tensor-parallel rank builds
the same one.
"""

from dataclasses import dataclass

import numpy as np

# A shared prefix shorter than this is read per sequence as before: the tile's extra partial
# results and launch cost more than the few blocks saved.
MIN_SHARED_BLOCKS = 4
# Tiles per step (a fixed count, so CUDA graphs can be captured for it); the groups that save the
# most reads get them first.
MAX_TILES = 32


@dataclass
class SharedPrefixPlan:
    shared_lens: np.ndarray   # [B] int32: positions of sequence i read through its tile (0: none)
    tile_seqs: np.ndarray     # [tiles, tile_size] int32: each tile's sequences, -1 pads
    tile_lens: np.ndarray     # [tiles] int32: the positions a tile's sequences share


def plan_shared_prefixes(tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                         tile_size: int) -> SharedPrefixPlan | None:
    """tables [B, W] int32 (rows zero-padded), seq_lens [B]: groups of >= 2 sequences with the same
    first block, each sharing the whole blocks that all its members' tables agree on and that lie
    inside every member's context. Sequences with seq_len 0 take no part (a mixed step's chunks of
    several tokens). None when no group shares MIN_SHARED_BLOCKS blocks."""
    seq_lens = np.asarray(seq_lens)
    active = np.flatnonzero(seq_lens > 0)
    if len(active) < 2:
        return None
    first = tables[active, 0]
    by_first = np.argsort(first, kind="stable")
    cuts = np.flatnonzero(np.diff(first[by_first])) + 1     # where the first block id changes
    if len(cuts) == len(active) - 1:
        return None                          # no two sequences start alike
    inside = seq_lens // block_size          # whole blocks within each context
    groups = []
    for members in np.split(active[by_first], cuts):
        if len(members) < 2:
            continue
        rows = tables[members]
        agree = np.logical_and.accumulate(rows == rows[0], axis=1).all(axis=0)
        blocks = min(int(agree.sum()), int(inside[members].min()))
        if blocks >= MIN_SHARED_BLOCKS:
            groups.append((len(members) * blocks, members, blocks))
    if not groups:
        return None
    groups.sort(key=lambda g: -g[0])
    shared_lens = np.zeros(len(tables), dtype=np.int32)
    tile_seqs = np.full((MAX_TILES, tile_size), -1, dtype=np.int32)
    tile_lens = []
    for _, members, blocks in groups:
        for start in range(0, len(members), tile_size):
            if len(tile_lens) == MAX_TILES:
                break
            chunk = members[start:start + tile_size]
            tile_seqs[len(tile_lens), :len(chunk)] = chunk
            tile_lens.append(blocks * block_size)
            shared_lens[chunk] = blocks * block_size
    return SharedPrefixPlan(shared_lens, tile_seqs[:len(tile_lens)], np.array(tile_lens, dtype=np.int32))
