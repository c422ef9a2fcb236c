"""From the fused q/k/v projection to what attention reads, in one launch: RMS-normalise each q and k
head (Qwen3's qk-norm, optional), rotate both (rotate-half layout), write q out and k, v into the
paged KV pool. Unfused, those were five kernels a layer (two norms, two rotary kernels, the store),
each a microsecond or more of a decode step's fixed cost (docs/benchmarks.md)."""

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _norm_rotate(x1, x2, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """Heads [HEADS_PAD, HALF] x 2 halves of one token, as loaded: normalised (rounded as the unfused
    norm stores them), rotated in fp32."""
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _qk_rope_store_kernel(qkv_ptr, q_out_ptr, positions_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr, eps,
                          k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_qkv, stride_cos,
                          stride_cb, stride_cs, stride_ch,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
    """One program per token. Every load that does not need another's value is issued before any of
    them is used (the position's cos/sin rows the only second round trip): a warp issues in order,
    so a load placed after a use waits for it, and the program is a few such waits long."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HALF_PAD)[None, :]
    in_half = dims < HALF
    if NORM:    # weights: before the wait, as nothing writes them
        q_w1 = tl.load(q_w_ptr + dims, mask=in_half).to(tl.float32)
        q_w2 = tl.load(q_w_ptr + HALF + dims, mask=in_half).to(tl.float32)
        k_w1 = tl.load(k_w_ptr + dims, mask=in_half).to(tl.float32)
        k_w2 = tl.load(k_w_ptr + HALF + dims, mask=in_half).to(tl.float32)
    else:
        q_w1 = None
        q_w2 = None
        k_w1 = None
        k_w2 = None
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    row = qkv_ptr + token * stride_qkv
    q_heads = tl.arange(0, Q_PAD)[:, None]
    q_mask = (q_heads < NUM_HEADS) & in_half
    q1 = tl.load(row + q_heads * HEAD_DIM + dims, mask=q_mask, other=0.0)
    q2 = tl.load(row + q_heads * HEAD_DIM + HALF + dims, mask=q_mask, other=0.0)
    kv_heads = tl.arange(0, KV_PAD)[:, None]
    kv_mask = (kv_heads < NUM_KV_HEADS) & in_half
    k_row = row + NUM_HEADS * HEAD_DIM + kv_heads * HEAD_DIM + dims
    v_row = k_row + NUM_KV_HEADS * HEAD_DIM
    k1 = tl.load(k_row, mask=kv_mask, other=0.0)
    k2 = tl.load(k_row + HALF, mask=kv_mask, other=0.0)
    v1 = tl.load(v_row, mask=kv_mask)
    v2 = tl.load(v_row + HALF, mask=kv_mask)
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=in_half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + dims, mask=in_half, other=0.0).to(tl.float32)

    q1, q2 = _norm_rotate(q1, q2, q_w1, q_w2, cos, sin, eps, HEAD_DIM, NORM)
    q_out = q_out_ptr + token * (NUM_HEADS * HEAD_DIM) + q_heads * HEAD_DIM + dims
    tl.store(q_out, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_out + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    k1, k2 = _norm_rotate(k1, k2, k_w1, k_w2, cos, sin, eps, HEAD_DIM, NORM)
    store = kv_mask & (kv_heads * 0 + slot >= 0)   # slot -1 (padding): nothing stored. A block, not a
    # scalar, on the right: the CPU interpreter turns a broadcast scalar mask into integers
    at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_heads * stride_ch + dims
    cache_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + at, k1.to(q_out_ptr.dtype.element_ty).to(cache_dtype), mask=store)
    tl.store(k_cache_ptr + at + HALF, k2.to(q_out_ptr.dtype.element_ty).to(cache_dtype), mask=store)
    tl.store(v_cache_ptr + at, v1.to(cache_dtype), mask=store)
    tl.store(v_cache_ptr + at + HALF, v2.to(cache_dtype), mask=store)


def qk_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  norm_weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float, num_heads: int,
                  num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, (num_heads + 2 * num_kv_heads) * head_dim], rows contiguous; cos/sin [max_positions,
    head_dim / 2]; norm_weights (q, k) [head_dim] or None; caches [blocks, block_size, kv_heads,
    head_dim] (k and v alike). Returns q [T, num_heads, head_dim], normalised and rotated; k (so
    treated) and v go to slot_mapping's slots (-1: not stored)."""
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert cos.is_contiguous() and sin.is_contiguous() and k_cache.stride() == v_cache.stride()
    assert head_dim % 2 == 0 and k_cache.stride(-1) == 1
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    q_w, k_w = norm_weights if norm_weights is not None else (cos, cos)   # unread without NORM
    _qk_rope_store_kernel[(num_tokens,)](
        qkv, q, positions, cos, sin, q_w, k_w, eps, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=k_cache.shape[1],
        NORM=norm_weights is not None, num_warps=4, **pdl.launch_options(qkv.device))
    return q
