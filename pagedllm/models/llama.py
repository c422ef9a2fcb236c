"""The decoder shared by Llama, Mistral, Qwen2 and Qwen3: they differ only in two switches.

  qkv_bias  Qwen2 adds biases to q/k/v (Llama and Qwen3: only if config.attention_bias)
  qk_norm   Qwen3 RMS-normalises each head of q and k before the rotary embedding

Q/K/V and gate/up projections are each one fused matmul; load_weights maps the checkpoint's
separate tensors into their shards. The model works on the flattened batch: [T, hidden].
With tensor parallelism each rank holds its share of the heads and of the MLP (layers/linear.py)
and of the vocabulary (layers/embedding.py); the KV heads are split, or replicated when there are
fewer of them than ranks.
"""

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.distributed.parallel_state import SINGLE, TPGroup
from pagedllm.layers.attention import Attention, AttentionMetadata, QKVLayout
from pagedllm.layers.embedding import VocabParallelEmbedding
from pagedllm.layers.linear import (ColumnParallelLinear, RowParallelLinear, Shard, activation_in_gate_up,
                                    copy_whole)
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding

# checkpoint name fragment -> (fused parameter fragment, shard index)
PACKED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class DecoderAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, backend, qkv_bias: bool, qk_norm: bool,
                 tp: TPGroup) -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_heads = heads // tp.size
        self.num_kv_heads = max(1, kv_heads // tp.size)
        d = self.head_dim
        kv = Shard(kv_heads * d, min(kv_heads, tp.size))
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [Shard(heads * d, tp.size), kv, kv], tp, qkv_bias)
        self.shard_sizes = self.qkv_proj.shard_sizes
        self.o_proj = RowParallelLinear(heads * d, config.hidden_size, tp, getattr(config, "attention_bias", False))
        norms = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            norms = (self.q_norm, self.k_norm)
        layout = QKVLayout(self.num_heads, self.num_kv_heads, self.head_dim, rotary, norms)
        self.attn = Attention(layout, backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        out = self.attn(positions, self.qkv_proj(hidden), md)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [Shard(size, tp.size)] * 2, tp, bias)
        self.shard_sizes = self.gate_up_proj.shard_sizes
        self.down_proj = RowParallelLinear(size, config.hidden_size, tp, bias)
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """After the small-batch kernel's gate/up, the down projection launches only once gate/up has
        ended: launched early (PDL) beside it, Qwen3-8B's batch-1 step took 4.64 ms instead of 4.49
        (docs/benchmarks.md). After the skinny kernel's gate/up, PDL still pays (0.6B: 0.937 ms against 0.963)."""
        if activation_in_gate_up(x, self.gate_up_proj.weight):
            return self.down_proj(self.gate_up_proj(x, activate=True), overlap=False)
        return self.down_proj(self.gate_up_proj(x), gated=True)


class DecoderLayer(nn.Module):
    def __init__(self, config, rotary, backend, qkv_bias: bool, qk_norm: bool, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, rotary, backend, qkv_bias, qk_norm, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, positions, hidden, residual, md):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, md)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config, backend, max_positions: int, qkv_bias: bool, qk_norm: bool, tp: TPGroup) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(config, rotary, backend, qkv_bias, qk_norm, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, md):
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, md)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False

    def __init__(self, config, backend, max_positions: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        sliding = getattr(config, "sliding_window", None)
        if sliding is not None and getattr(config, "use_sliding_window", True) and max_positions > sliding:
            raise ValueError(f"max_model_len {max_positions} exceeds the model's sliding_window {sliding}; "
                             "sliding-window attention is not supported, lower max_model_len")
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = DecoderModel(config, backend, max_positions, qkv_bias, self.qk_norm, tp)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids, positions, md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, md)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (gathered from every rank)."""
        return (self.model.embed_tokens if self.lm_head is None else self.lm_head).logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full checkpoint tensors (Hugging Face names, or our fused names) in: q/k/v and
        gate/up go to their shard of the fused layer, and each parameter's weight_loader keeps
        this rank's piece. Every parameter must be written exactly once."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = name, None
            for fragment, (fused, index) in PACKED_SHARDS.items():
                if f".{fragment}." in name:
                    target, shard = name.replace(fragment, fused), index
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            param = params[target]
            getattr(param, "weight_loader", copy_whole)(param, tensor, shard)
            loaded.add(target if shard is None else f"{target}#{shard}")
        missing = [n for n, p in params.items() if n not in loaded and not _all_shards_loaded(n, loaded, self)]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights (benchmarks without a checkpoint), drawn in the single-rank shapes and
        then split like a checkpoint, so every tensor-parallel size runs the same model."""
        device = self.model.embed_tokens.weight.device
        with torch.device("meta"):
            whole = type(self)(self.config, None, self.max_positions)
        self.load_weights(_dummy_tensor(name, p.shape, device, seed + i)
                          for i, (name, p) in enumerate(whole.named_parameters()))


def _dummy_tensor(name: str, shape: torch.Size, device: torch.device, seed: int) -> tuple[str, torch.Tensor]:
    if "norm" in name:
        return name, torch.ones(shape, device=device)
    if name.endswith("bias"):
        return name, torch.zeros(shape, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return name, torch.empty(shape, device=device).normal_(0.0, 0.02, generator=gen)


def _all_shards_loaded(name: str, loaded: set[str], model: nn.Module) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    shards = getattr(module, "shards", None)
    return shards is not None and all(f"{name}#{i}" in loaded for i in range(len(shards)))


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
