"""Paged attention in Triton: same layouts and semantics as pagedllm.kernels.torch_ref.

Two entry points:
  paged_attention   one kernel for a mixed batch of prefill chunks (causal over a cached prefix
                    plus themselves, varlen) and decodes, flash-attention style.
  decode_attention  decode-only (one query token per sequence) split-K flash decoding for long
                    contexts; launch grid and scratch sizes depend only on shapes and
                    max_model_len, so it can be captured in a CUDA graph.

Both handle GQA without repeating K/V: a program owns one KV head and all the query heads that
share it, so every K/V tile is loaded once per group. Scores use exp2 with the softmax scale
folded into log2(e); accumulation is fp32. Block-table entries are widened to int64 before they
are multiplied by the pool's strides (a pool can exceed 2**31 elements).

Integer arguments that change from step to step (the number of sequences, the block-table row
stride) are not specialised on: Triton would otherwise compile a variant per value class (== 1,
divisible by 16, other), about a second each, in the middle of serving.
"""

import functools

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs

_LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (Triton's default would be tf32, ~1e-3 error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attend_span(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, kv_head, start, end, scale_log2,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 DIM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 WHOLE_TILES: tl.constexpr = False, K_ROWS: tl.constexpr = False):
    """Online-softmax sweep of every query row of `q` over positions start..end-1 of one block
    table; with CAUSAL, row r sees only positions <= q_pos[r] (q_pos is unread otherwise). If the
    span is not empty, every row must see a position of its first tile: each row max is then finite
    afterwards and l_i >= 1, so no -inf/-inf or 0/0 guards are needed.
    WHOLE_TILES: the span is whole tiles and the head dim a power of two, so nothing is masked.
    K_ROWS: K is loaded as [BLOCK_N, D] rows and transposed for the dot. Both made prefill 8-11%
    faster on the H200 (benchmarks/results/h200/prefill-attention-variants.txt); the decode
    kernels keep the layout they were tuned with."""
    offs_d = tl.arange(0, DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        if WHOLE_TILES:
            block = tl.load(block_table + offs_n // BLOCK_SIZE).to(tl.int64)
        else:
            block = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        k_rows = block * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_rows = block * stride_vb + slot * stride_vs + kv_head * stride_vh
        if K_ROWS and WHOLE_TILES:
            k = tl.trans(tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :]))
        elif K_ROWS:
            k = tl.trans(tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :],
                                 mask=n_valid[:, None] & d_valid[None, :], other=0.0))
        else:
            k = tl.load(k_cache_ptr + k_rows[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None],
                        other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if CAUSAL:
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
        elif not WHOLE_TILES:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WHOLE_TILES:
            v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :])
        else:
            v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :],
                        other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# --------------------------------------------------------------------------------------------
# Mixed prefill/decode kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _find_seq(cu_seqlens_q_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Sequence owning query block `pid`: sequence i's blocks start at cu_seqlens_q[i] // BLOCK_Q + i
    (an increasing sequence), so binary-search for the last start <= pid."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr,
        num_seqs, scale_log2,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, MIN_Q_LEN: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid (query blocks, kv heads). A program takes BLOCK_Q query tokens of one sequence times the
    GROUP query heads of one KV head, folded into BLOCK_M rows (row m = token m // GROUP, head
    m % GROUP), and sweeps the sequence's KV positions up to its last query's position. Sequences
    with fewer than MIN_Q_LEN query tokens are left alone (2: single tokens go to decode_attention)."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    # the grid over-provisions by up to one block per sequence
    if (q_block * BLOCK_Q >= q_len) | (q_len < MIN_Q_LEN):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len        # cached prefix; query token j sits at context_len + j

    offs_m = tl.arange(0, BLOCK_M)
    token = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = context_len + token
    offs_d = tl.arange(0, DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    row = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Positions before the block's first query token are visible to all its rows: no causal mask
    # there. Then the diagonal part, up to the last query token, with it. The split is rounded down
    # to a whole tile, so the two sweeps take no more tiles than one would (and the diagonal
    # sweep's first position is visible to every row).
    diagonal = (context_len + q_block * BLOCK_Q) // BLOCK_N * BLOCK_N
    kv_end = context_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    m_i, l_i, acc = _attend_span(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, kv_head, 0,
                                 diagonal, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                 stride_vh, DIM_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
                                 WHOLE_TILES=DIM_PAD == HEAD_DIM, K_ROWS=True)
    m_i, l_i, acc = _attend_span(q, q_pos, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, kv_head, diagonal,
                                 kv_end, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                 stride_vh, DIM_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, K_ROWS=True)

    out = acc / l_i[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def _paged_attention_launch(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, out,
                            block_m: int, block_n: int, num_warps: int, num_stages: int,
                            skip_single_token: bool = False) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    num_seqs = seq_lens.shape[0]
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables,
        num_seqs, scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), GROUP=group,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        MIN_Q_LEN=2 if skip_single_token else 1, DOT_PRECISION=_dot_precision(query.dtype), num_warps=num_warps, num_stages=num_stages)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int, max_seq_len: int,
                    out: torch.Tensor | None = None, skip_single_token: bool = False) -> torch.Tensor:
    """Causal attention of a mixed batch of prefill chunks and decodes over the paged pool.

    query [T, num_heads, head_dim]; k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim];
    cu_seqlens_q [B + 1] int32, seq_lens [B] int32, block_tables [B, max_blocks] int32 (rows may be
    padded). Returns (or fills `out`) [T, num_heads, head_dim] in query's dtype. Last dims must be
    contiguous. max_query_len picks the tile height (small tiles for decode-only batches);
    max_seq_len is part of the backend interface but not needed here: each program bounds its own
    KV sweep from seq_lens on the device. skip_single_token leaves the rows of sequences with one
    query token unwritten (the caller runs them through decode_attention with query_rows).
    """
    if out is None:
        out = torch.empty_like(query)
    if query.shape[0] == 0:
        return out
    assert query.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = query.shape[1] // k_cache.shape[2]
    # Decode rows fill only `group` of the tile's rows: use the smallest tile tl.dot allows. fp32
    # inputs (tests, debugging) take exact-fp32 FMA dots, which spill registers at 64-row tiles.
    block_m = 64 if max_query_len * group > 16 and query.element_size() == 2 else 16
    _paged_attention_launch(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, out,
                            block_m=block_m, block_n=64, num_warps=4, num_stages=2,
                            skip_single_token=skip_single_token)
    return out


# --------------------------------------------------------------------------------------------
# Split-K decode
# --------------------------------------------------------------------------------------------

@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split for one sequence: its length cut into NUM_SPLITS pieces, rounded up to whole
    tiles (at least one tile, so a 0-length sequence doesn't divide by zero later)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N


@triton.jit
def _store_partials(part_m_ptr, part_l_ptr, part_acc_ptr, part, valid, m_i, l_i, acc,
                    DIM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, DIM_PAD)
    tl.store(part_m_ptr + part, m_i, mask=valid)
    tl.store(part_l_ptr + part, l_i, mask=valid)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, shared_lens_ptr, q_rows_ptr, block_tables_ptr,
        part_m_ptr, part_l_ptr, part_acc_ptr, scale_log2,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, NUM_SLOTS: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_ROWS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Grid (kv heads, NUM_SPLITS, B). A program attends the GROUP query heads of one KV head (padded
    to BLOCK_H >= 16 rows for tl.dot) to its split of the context after the sequence's shared
    prefix (positions shared_lens[seq].., see _shared_prefix_kernel) and writes the partial row max
    (log2 domain), softmax denominator and unnormalised output. Splits past the end write nothing.
    The query is row q_rows[seq] of q with HAS_ROWS (a mixed step's single tokens), else row seq.
    The KV head is the fastest grid axis: programs that run side by side read the neighbouring
    per-head rows of the same cache blocks (2% faster than sequence-first at batches 128-256 on the
    H200, benchmarks/results/h200/decode-grid-order-7e0fec0.txt)."""
    wait_for_inputs(PDL)
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    shared = tl.load(shared_lens_ptr + seq) if HAS_SHARED else 0
    split_len = _split_len(seq_len - shared, NUM_SPLITS, BLOCK_N)
    start = shared + split * split_len
    if start >= seq_len:
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_valid = offs_h < GROUP
    head = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, DIM_PAD)
    row = tl.load(q_rows_ptr + seq) if HAS_ROWS else seq
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=h_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DIM_PAD], tl.float32)
    m_i, l_i, acc = _attend_span(q, start, m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                                 block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head, start, end, scale_log2,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                 DIM_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    part = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SLOTS + split       # [BLOCK_H]
    _store_partials(part_m_ptr, part_l_ptr, part_acc_ptr, part, h_valid, m_i, l_i, acc, DIM_PAD, HEAD_DIM)


@triton.jit(do_not_specialize=["stride_bt"])
def _shared_prefix_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, q_rows_ptr, block_tables_ptr, tile_seqs_ptr, tile_lens_ptr,
        part_m_ptr, part_l_ptr, part_acc_ptr, scale_log2,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
        TILE_SEQS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PREFIX_SPLITS: tl.constexpr, NUM_SLOTS: tl.constexpr, HAS_ROWS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Cascade attention's first level. Grid (tiles, kv heads, PREFIX_SPLITS). A tile is up to
    TILE_SEQS decoding sequences whose block tables start with the same tile_lens[tile] positions
    (a cached prefix they share): their query rows (TILE_SEQS x GROUP, row m = sequence m // GROUP,
    head m % GROUP) sweep that prefix together, so each K/V tile is read once for all of them
    instead of once per sequence. Partials go to slots NUM_SPLITS.. of each sequence, beside the
    split kernel's; unused tiles have length 0 and exit."""
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(tile_lens_ptr + tile)
    split_len = _split_len(prefix_len, PREFIX_SPLITS, BLOCK_N)
    start = split * split_len
    if start >= prefix_len:
        return
    end = tl.minimum(start + split_len, prefix_len)

    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    seq = tl.load(tile_seqs_ptr + tile * TILE_SEQS + member, mask=member < TILE_SEQS, other=-1)
    row_valid = seq >= 0
    offs_d = tl.arange(0, DIM_PAD)
    row = tl.load(q_rows_ptr + seq, mask=row_valid, other=0) if HAS_ROWS else seq
    q = tl.load(q_ptr + row.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    leader = tl.load(tile_seqs_ptr + tile * TILE_SEQS).to(tl.int64)      # any member's table will do
    m_i, l_i, acc = _attend_span(q, start, m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                                 block_tables_ptr + leader * stride_bt, kv_head, start, end, scale_log2,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                 DIM_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    part = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SLOTS + NUM_SPLITS + split
    _store_partials(part_m_ptr, part_l_ptr, part_acc_ptr, part, row_valid, m_i, l_i, acc, DIM_PAD, HEAD_DIM)


@triton.jit
def _decode_reduce_kernel(
        part_m_ptr, part_l_ptr, part_acc_ptr, seq_lens_ptr, shared_lens_ptr, q_rows_ptr, out_ptr, stride_ob,
        stride_oh,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PREFIX_SPLITS: tl.constexpr, NUM_SLOTS: tl.constexpr,
        SLOTS_PAD: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, HAS_SHARED: tl.constexpr,
        HAS_ROWS: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, heads / HEADS_PER_PROGRAM): rescale each written partial (the splits after the shared
    prefix, then the shared prefix's splits) by exp2(m_slot - m_max) and normalise. A sequence with
    seq_len 0 has no written partial and gets a zero row, unless HAS_ROWS (its row is another
    kernel's). A program takes several heads of its sequence, all their slots in one load."""
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + seq)
    if HAS_ROWS:
        if seq_len == 0:
            return
    shared = tl.load(shared_lens_ptr + seq) if HAS_SHARED else 0
    offs_s = tl.arange(0, SLOTS_PAD)
    split_len = _split_len(seq_len - shared, NUM_SPLITS, BLOCK_N)
    s_valid = (offs_s < NUM_SPLITS) & (shared + offs_s * split_len < seq_len)
    if HAS_SHARED:
        prefix_split = offs_s - NUM_SPLITS
        prefix_split_len = _split_len(shared, PREFIX_SPLITS, BLOCK_N)
        s_valid |= (prefix_split >= 0) & (prefix_split < PREFIX_SPLITS) & (prefix_split * prefix_split_len < shared)
    head = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    h_valid = head < NUM_HEADS
    offs_d = tl.arange(0, DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    part = (seq * NUM_HEADS + head[:, None]).to(tl.int64) * NUM_SLOTS + offs_s[None, :]    # [heads, slots]
    valid = s_valid[None, :] & h_valid[:, None]
    m = tl.load(part_m_ptr + part, mask=valid, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=valid, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                  mask=valid[:, :, None] & d_valid[None, None, :], other=0.0)
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(valid, tl.exp2(m - m_max[:, None]), 0.0)
    denom = tl.sum(l * w, 1)
    out = tl.sum(acc * w[:, :, None], 1) / tl.where(denom > 0, denom, 1.0)[:, None]
    row = tl.load(q_rows_ptr + seq) if HAS_ROWS else seq
    tl.store(out_ptr + row.to(tl.int64) * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_valid[:, None] & d_valid[None, :])


# Split sizing. Each sequence's context is cut into num_splits equal pieces (whole BLOCK_N tiles), with
# num_splits fixed per launch from shapes alone: enough (batch x kv_heads x splits) programs to give
# every SM ~16 of them, but no split shorter than _MIN_SPLIT_TOKENS of max_model_len (the partials'
# write + reduce cost stays small next to a split's K/V read) and at most _MAX_SPLITS (bounds scratch
# and the reduce tile). Splits past a shorter sequence's end exit at once. Batch 256 with 8 KV heads
# thus gets 2 splits, 128 gets 3, batch 1 at long context up to 64. Many programs a launch even out
# contexts of different lengths: on the H200, with contexts uniform in 200-2048 (bench_kernels.py),
# this and the tile below took decode attention from 308 to 292 us at batch 256, 167 to 148 at 128
# and 85 to 75 at 48 (4 programs an SM and 64-position tiles before), the reduce kernel included.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132      # CPU (Triton interpreter, tests): behave like an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, num_kv_heads: int, max_model_len: int, device: torch.device) -> int:
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_model_len, _MIN_SPLIT_TOKENS), _MAX_SPLITS))


def _decode_config(batch: int, num_kv_heads: int, cascade: bool, device: torch.device) -> dict:
    """The split kernels' tile and launch shape. block_n, the context positions a program takes per
    iteration: 128 once the sequences alone give every SM a program (on the H200 3-10% faster than 64
    at batches 48-256), else 64, where splits are short and many (batch 1: 64 is ~1 us a layer
    faster), and 64 with cascade tiles (whose up to 64 query rows would hold twice the scores at 128;
    not measured)."""
    block_n = 128 if batch * num_kv_heads >= _num_sms(device) and not cascade else 64
    return dict(block_n=block_n, num_warps=4, num_stages=2)


# Cascade: a tile's query rows (sequences x GROUP heads) fill one tl.dot tile of this height; its
# prefix is cut into PREFIX_SPLITS pieces so a few tiles still spread over the SMs.
_SHARED_TILE_ROWS = 64
_PREFIX_SPLITS = 8


def shared_tile_seqs(num_heads: int, num_kv_heads: int) -> int:
    """How many sequences one shared-prefix tile holds (tile_seqs' row length)."""
    return max(1, _SHARED_TILE_ROWS // (num_heads // num_kv_heads))


def _decode_attention_launch(query, k_cache, v_cache, seq_lens, block_tables, scale, out, num_splits: int,
                             block_n: int, num_warps: int, num_stages: int, shared_lens=None, tile_seqs=None,
                             tile_lens=None, query_rows=None) -> None:
    batch = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    dim_pad = triton.next_power_of_2(head_dim)
    has_shared, has_rows = shared_lens is not None, query_rows is not None
    prefix_splits = _PREFIX_SPLITS if has_shared else 0
    num_slots = num_splits + prefix_splits
    part_m = torch.empty(batch, num_heads, num_slots, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, num_heads, num_slots, head_dim, dtype=torch.float32, device=query.device)
    shared_lens = shared_lens if has_shared else seq_lens        # unread without HAS_SHARED / HAS_ROWS
    query_rows = query_rows if has_rows else seq_lens
    strides = (query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    shapes = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad, GROUP=group, BLOCK_SIZE=k_cache.shape[1],
                  BLOCK_N=block_n, NUM_SPLITS=num_splits, NUM_SLOTS=num_slots, HAS_ROWS=has_rows,
                  DOT_PRECISION=_dot_precision(query.dtype))
    chained = pdl.launch_options(query.device)
    launch = dict(num_warps=num_warps, num_stages=num_stages, **chained)
    _decode_split_kernel[(num_kv_heads, num_splits, batch)](
        query, k_cache, v_cache, seq_lens, shared_lens, query_rows, block_tables,
        part_m, part_l, part_acc, scale * _LOG2E, *strides, **shapes,
        BLOCK_H=max(16, triton.next_power_of_2(group)), HAS_SHARED=has_shared, **launch)
    if has_shared and tile_lens.shape[0] > 0:
        tile_size = tile_seqs.shape[1]
        _shared_prefix_kernel[(tile_lens.shape[0], num_kv_heads, prefix_splits)](
            query, k_cache, v_cache, query_rows, block_tables, tile_seqs, tile_lens, part_m, part_l, part_acc,
            scale * _LOG2E, *strides, **shapes, TILE_SEQS=tile_size,
            BLOCK_M=max(16, triton.next_power_of_2(tile_size * group)), PREFIX_SPLITS=prefix_splits, **launch)
    slots_pad = triton.next_power_of_2(num_slots)
    heads_per_program = _reduce_heads(batch, num_heads, slots_pad, query.device)
    _decode_reduce_kernel[(batch, triton.cdiv(num_heads, heads_per_program))](
        part_m, part_l, part_acc, seq_lens, shared_lens, query_rows, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        PREFIX_SPLITS=prefix_splits, NUM_SLOTS=num_slots, SLOTS_PAD=slots_pad, HEADS_PER_PROGRAM=heads_per_program,
        HAS_SHARED=has_shared, HAS_ROWS=has_rows, num_warps=4, **chained)


# The reduce runs after the split kernel has ended, so its time is its programs' latency: one program
# a (sequence, head) made 2-4 waves of short programs at batches 48-256 and added 5.5-7 us a layer
# on the H200 (benchmarks/results/h200/decode-critical-path-batches-672247e.txt). A program takes as
# many heads as keep its tile (heads x slots) within _REDUCE_TILE_SLOTS and the grid at least a
# program an SM.
_REDUCE_TILE_SLOTS = 64


def _reduce_heads(batch: int, num_heads: int, slots_pad: int, device: torch.device) -> int:
    """Heads a reduce program takes (a power of two)."""
    heads = 1
    while (heads * 2 <= num_heads and heads * 2 * slots_pad <= _REDUCE_TILE_SLOTS
           and batch * triton.cdiv(num_heads, heads * 2) >= _num_sms(device)):
        heads *= 2
    return heads


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_model_len: int,
                     out: torch.Tensor | None = None, shared_lens: torch.Tensor | None = None,
                     tile_seqs: torch.Tensor | None = None, tile_lens: torch.Tensor | None = None,
                     query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention: one query token per sequence at position seq_lens[i] - 1, attending to
    positions 0..seq_lens[i]-1 of the paged pool.

    query [B, num_heads, head_dim], or [T, ...] with query_rows [B] int32 naming each sequence's row
    (a mixed step's single-token sequences; the other sequences get seq_len 0 and are not written).
    seq_lens [B] int32, block_tables [B, max_blocks] int32. Returns (or fills `out`) in query's shape
    and dtype; rows with seq_len 0 (batch padding) come out as zeros. Grid and scratch depend only on
    B, head counts and max_model_len (no host sync), so it is CUDA-graph safe. max_model_len only sets
    the split count: a longer sequence is still correct, in longer splits.

    Cascade attention for sequences that share a cached prefix (same leading blocks):
    tile_seqs [tiles, shared_tile_seqs(...)] int32 lists each tile's sequences (-1 pads), tile_lens
    [tiles] int32 the positions they share (a multiple of the block size, at most each member's
    seq_len; 0 for an unused tile), shared_lens [B] int32 each sequence's tile length (0 if in none).
    The shared positions are read once per tile; the rest of each context as usual.
    """
    if out is None:
        out = torch.empty_like(query)
    batch = seq_lens.shape[0]
    if batch == 0:
        return out
    assert query.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert (shared_lens is None) == (tile_seqs is None) == (tile_lens is None)
    num_splits = _num_splits(batch, k_cache.shape[2], max_model_len, query.device)
    config = _decode_config(batch, k_cache.shape[2], shared_lens is not None, query.device)
    _decode_attention_launch(query, k_cache, v_cache, seq_lens, block_tables, scale, out, num_splits, **config,
                             shared_lens=shared_lens, tile_seqs=tile_seqs, tile_lens=tile_lens, query_rows=query_rows)
    return out
