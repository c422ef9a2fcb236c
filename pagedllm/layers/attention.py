"""The one attention interface: from a layer's fused q/k/v projection, store this step's K/V into the
paged pool (after Qwen3's qk-norm and rotary), then attend through it.

The model runner builds one AttentionMetadata per step and passes it down the forward call; the
backend (plain torch on CPU, Triton on GPU) is chosen once when the model is built.
"""

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.kernels import torch_ref


@dataclass
class SharedPrefixes:
    """Cascade attention for a step's decoding sequences: those sharing a cached prefix, in tiles
    (layouts in kernels/triton/paged_attention.decode_attention; planned in worker/shared_prefix.py)."""
    shared_lens: torch.Tensor      # [B] int32
    tile_seqs: torch.Tensor        # [tiles, tile size] int32
    tile_lens: torch.Tensor        # [tiles] int32


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the pool and what each sequence attends to (layouts in
    kernels/torch_ref.py)."""
    slot_mapping: torch.Tensor     # [T] int64
    cu_seqlens_q: torch.Tensor     # [B + 1] int32
    seq_lens: torch.Tensor         # [B] int32
    block_tables: torch.Tensor     # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # Triton backend only: cascade plan, and in mixed steps the seq_lens of single-token sequences
    # (0 for the others), which then go through the decode kernels instead of the unified one
    shared: SharedPrefixes | None = None
    single_token_lens: torch.Tensor | None = None   # [B] int32

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class QKVLayout:
    """How a layer's fused q/k/v projection output is cut into heads, and what happens to q and k
    before attention: Qwen3's per-head RMSNorm (`norms`, the q and k RMSNorm modules) and rotary."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: nn.Module
    norms: tuple[nn.Module, nn.Module] | None = None

    def split(self, qkv: torch.Tensor, positions: torch.Tensor):
        """The unfused steps: q [T, H, D] and k, v [T, KVH, D], q and k normalised and rotated."""
        kv = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.norms is not None:
            q, k = self.norms[0](q), self.norms[1](k)
        q, k = self.rotary(positions, q, k)
        return q, k, v


class TorchBackend:
    """Reference backend: gathers each sequence's blocks and runs dense attention."""

    def shared_tile_seqs(self, num_heads: int, num_kv_heads: int) -> int:
        return 0      # reads every context whole: no use for a SharedPrefixes plan

    def rope_store(self, qkv, positions, layout: QKVLayout, k_cache, v_cache, md: AttentionMetadata):
        """q/k norms and rotary, then k and v into the pool; returns q."""
        q, k, v = layout.split(qkv, positions)
        torch_ref.store_kv(k, v, k_cache, v_cache, md.slot_mapping)
        return q

    def attend(self, query, k_cache, v_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
        return torch_ref.paged_attention(query, k_cache, v_cache, md.cu_seqlens_q, md.seq_lens,
                                         md.block_tables, scale)


class TritonBackend:
    """GPU backend: one launch for q/k norms, rotary and the K/V store, one unified kernel for mixed
    batches, and a split-K kernel with a fixed grid for decode-only steps (safe to capture in CUDA
    graphs)."""

    def __init__(self, max_model_len: int) -> None:
        from pagedllm.kernels.triton import paged_attention, qk_rope_store
        self._rope_store = qk_rope_store.qk_rope_store
        self._mixed = paged_attention.paged_attention
        self._decode = paged_attention.decode_attention
        self._tile_seqs = paged_attention.shared_tile_seqs
        self.max_model_len = max_model_len

    def shared_tile_seqs(self, num_heads: int, num_kv_heads: int) -> int:
        """Sequences per shared-prefix tile of decode steps."""
        return self._tile_seqs(num_heads, num_kv_heads)

    def rope_store(self, qkv, positions, layout: QKVLayout, k_cache, v_cache, md: AttentionMetadata):
        """One kernel for what TorchBackend.rope_store does in steps."""
        norms = layout.norms
        weights = None if norms is None else (norms[0].weight, norms[1].weight)
        return self._rope_store(qkv, positions, layout.rotary.cos, layout.rotary.sin, weights,
                                0.0 if norms is None else norms[0].eps, layout.num_heads, layout.num_kv_heads,
                                k_cache, v_cache, md.slot_mapping)

    def attend(self, query, k_cache, v_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
        shared = {} if md.shared is None else vars(md.shared)
        if md.decode_only:
            return self._decode(query, k_cache, v_cache, md.seq_lens, md.block_tables, scale, self.max_model_len,
                                **shared)
        singles = md.single_token_lens
        out = self._mixed(query, k_cache, v_cache, md.cu_seqlens_q, md.seq_lens, md.block_tables, scale,
                          md.max_query_len, md.max_seq_len, skip_single_token=singles is not None)
        if singles is not None:
            self._decode(query, k_cache, v_cache, singles, md.block_tables, scale, self.max_model_len, out=out,
                         query_rows=md.cu_seqlens_q[:-1], **shared)
        return out


def select_backend(device: str, max_model_len: int):
    return TritonBackend(max_model_len) if device.startswith("cuda") else TorchBackend()


class Attention(nn.Module):
    def __init__(self, layout: QKVLayout, backend) -> None:
        super().__init__()
        self.layout = layout
        self.scale = layout.head_dim ** -0.5
        self.backend = backend
        self.k_cache = torch.empty(0)   # views into the pool, bound by the model runner
        self.v_cache = torch.empty(0)

    @property
    def num_heads(self) -> int:
        return self.layout.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.layout.num_kv_heads

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (H + 2 KVH) * D], the fused projection's output -> [T, H, D]."""
        q = self.backend.rope_store(qkv, positions, self.layout, self.k_cache, self.v_cache, md)
        return self.backend.attend(q, self.k_cache, self.v_cache, md, self.scale)
