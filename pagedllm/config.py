"""Engine configuration, validated once at the edge into frozen dataclasses that the rest trusts.

Kept free of torch so the scheduler and KV cache manager can import it.
"""

from dataclasses import dataclass
from typing import Any

GiB = 1 << 30


@dataclass(frozen=True)
class ModelConfig:
    model: str                 # what the user named (path, Hub id, GGUF file)
    hf_config: Any             # transformers PretrainedConfig
    dtype: str                 # "float32" | "bfloat16" | "float16"
    max_model_len: int
    load_format: str = "auto"  # "auto" | "dummy"
    served_model_name: str | None = None
    tensor_parallel_size: int = 1

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads are split across tensor-parallel ranks, or replicated when there are fewer."""
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_rank(self) -> int:
        """What one rank's pool holds per token (the whole model's with one rank)."""
        return self.kv_bytes_per_token * self.kv_heads_per_rank // self.num_kv_heads


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None    # pool bytes per rank; None: 2 GiB on CPU, by utilisation on a GPU
    num_gpu_blocks_override: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str = "cpu"
    enforce_eager: bool = False
    seed: int = 0
    data_parallel_size: int = 1      # engine cores behind one front end, each a copy of this config
