"""Plain-torch paged attention: the CPU backend and the oracle the Triton kernels are tested against.

Layouts shared by every backend:
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping:     [T] int64, slot = block_id * block_size + offset; -1 means "do not store"
  cu_seqlens_q:     [B + 1] int32, sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1]
  seq_lens:         [B] int32, context length of sequence i including this step's tokens
  block_tables:     [B, max_blocks] int32, block holding position p is block_tables[i, p // block_size]
Query row j of a sequence with q_len rows sits at position seq_lens[i] - q_len + j and attends
causally to positions 0..that position.
"""

import torch


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value rows [T, kv_heads, head_dim] into the pool at their slots.
    index_copy_, not indexed assignment: on CPU the latter costs time in proportion to the whole
    pool (about 20 ms a call for a 2 GiB pool), index_copy_ only to the rows written."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence, [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """q [..., Q, H, D], k/v [..., K, KVH, D], mask [..., Q, K] True = attend. GQA by grouping heads."""
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    group = num_heads // num_kv_heads
    qg = q.unflatten(-2, (num_kv_heads, group)).float()          # [..., Q, KVH, G, D]
    scores = torch.einsum("...qhgd,...khd->...hgqk", qg, k.float()) * scale
    scores = scores.masked_fill(~mask.unsqueeze(-3).unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("...hgqk,...khd->...qhgd", probs, v.float())
    return out.flatten(-3, -2).to(q.dtype)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of a mixed batch of prefill chunks and decodes over the paged pool."""
    out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    decode_rows = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    if decode_rows:
        out[[cu[i] for i in decode_rows]] = _decode(query, k_cache, v_cache, cu, lens, block_tables,
                                                    decode_rows, scale)
    for i in range(len(lens)):
        start, end = cu[i], cu[i + 1]
        q_len = end - start
        if q_len <= 1:
            continue
        k = gather_kv(k_cache, block_tables[i], lens[i])
        v = gather_kv(v_cache, block_tables[i], lens[i])
        q_pos = torch.arange(lens[i] - q_len, lens[i], device=query.device).unsqueeze(1)
        mask = torch.arange(lens[i], device=query.device).unsqueeze(0) <= q_pos
        out[start:end] = _attend(query[start:end], k, v, scale, mask)
    return out


def _decode(query, k_cache, v_cache, cu, lens, block_tables, rows, scale):
    """All single-token rows at once: pad their contexts to the longest and mask the rest."""
    max_len = max(lens[i] for i in rows)
    k = torch.stack([_padded(k_cache, block_tables[i], lens[i], max_len) for i in rows])
    v = torch.stack([_padded(v_cache, block_tables[i], lens[i], max_len) for i in rows])
    q = query[[cu[i] for i in rows]].unsqueeze(1)                     # [B, 1, H, D]
    lengths = torch.tensor([lens[i] for i in rows], device=query.device).unsqueeze(1)
    mask = (torch.arange(max_len, device=query.device).unsqueeze(0) < lengths).unsqueeze(1)  # [B, 1, K]
    return _attend(q, k, v, scale, mask).squeeze(1)


def _padded(cache, block_table, length, max_len):
    kv = gather_kv(cache, block_table, length)
    return torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, max_len - length))
