"""EngineArgs: what a user may set (vLLM's names), resolved once into a validated EngineConfig."""

import argparse
import logging
from dataclasses import dataclass, fields, replace

import torch

from pagedllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pagedllm.engine.router import ROUTING_POLICIES
from pagedllm.models import loader

logger = logging.getLogger(__name__)

DP_BACKENDS = ("mp", "ray")
DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "half": "float16"}


@dataclass
class EngineArgs:
    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"
    enable_prefix_caching: bool = True
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    device: str | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    tokenizer: str | None = None      # another tokenizer than the model's (folder, Hub id or .gguf)
    core_process: bool = False        # LLM only: the engine core in its own process (the server always is)
    data_parallel_size: int = 1       # engine cores, each with the whole model (and its own GPUs)
    data_parallel_backend: str = "mp"   # where they run: local processes ("mp") or Ray actors ("ray")
    routing: str = "prefix"           # how a request's core is picked (engine/router.py)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
        """vLLM's flag names for the engine options."""
        help_ = "HF folder, Hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct)"
        if model_positional:
            parser.add_argument("model", nargs="?", default=None, help=help_)
        else:
            parser.add_argument("--model", default=None, help=help_)
        parser.add_argument("--tokenizer", default=None,
                            help="use this tokenizer (folder, Hub id or .gguf) instead of the model's")
        parser.add_argument("--dtype", default="auto")
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--max-num-seqs", type=int, default=256)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        parser.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=int, default=None,
                            help="KV pool bytes per rank (default: 2 GiB on CPU; on a GPU what "
                                 "--gpu-memory-utilization leaves, which this replaces)")
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                            help="split the model across this many GPUs (or CPU processes), one process each")
        parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                            help="run this many engine cores, each with the whole model (and tensor-parallel-size "
                                 "GPUs of its own), behind one front end")
        parser.add_argument("--data-parallel-backend", default="mp", choices=DP_BACKENDS,
                            help="mp: the cores are local processes; ray: Ray actors on the nodes of the Ray "
                                 "cluster this machine belongs to, or of a local Ray started for them "
                                 "(pip install 'pagedllm[ray]'; --device cuda for GPU nodes when this machine "
                                 "has none)")
        parser.add_argument("--routing", default="prefix", choices=ROUTING_POLICIES,
                            help="with several cores: prefer the core caching the longest prefix of the prompt "
                                 "(unless much busier), or the least-loaded core, or each in turn")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default=None)

    def to_cli_args(self) -> list[str]:
        """The flags that give these arguments (to start `pagedllm serve` like this engine)."""
        out = [self.model] if self.model else []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "core_process") or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            else:
                out += [flag, str(value)]
        return out

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineArgs":
        """The EngineArgs of parsed flags (those add_cli_args defines), with `overrides` on top."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    def create_config(self) -> tuple[EngineConfig, loader.ModelSource]:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_ray = self.data_parallel_backend == "ray" and self.data_parallel_size > 1
        if device.startswith("cuda") and not torch.cuda.is_available() and not on_ray:
            raise ValueError(f"device {device!r} requested but CUDA is not available")   # Ray: on the nodes
        self._check_parallel(device)
        dtype = self._dtype(device)
        source = loader.resolve(self.model, self.load_format)
        if self.tokenizer:
            source = replace(source, tokenizer=self.tokenizer)
        hf_config = loader.load_config(source)
        from pagedllm.models.registry import model_class
        model_class(hf_config)  # fail early on an unsupported architecture
        _check_splittable(hf_config, self.tensor_parallel_size)
        max_model_len = self._max_model_len(hf_config)
        _check(self.block_size in (8, 16, 32, 64, 128), "block_size", f"must be 8, 16, 32, 64 or 128, got {self.block_size}")
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
               f"must be > 0 bytes, got {self.kv_cache_memory}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        batched = self.max_num_batched_tokens or (8192 if device.startswith("cuda") else 2048)
        _check(batched >= 1, "max_num_batched_tokens", f"must be >= 1, got {batched}")
        model_config = ModelConfig(model=source.name, hf_config=hf_config, dtype=dtype,
                                   max_model_len=max_model_len, load_format=self.load_format,
                                   served_model_name=self.served_model_name,
                                   tensor_parallel_size=self.tensor_parallel_size)
        cache = CacheConfig(block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            kv_cache_memory=self.kv_cache_memory,
                            num_gpu_blocks_override=self.num_gpu_blocks_override)
        scheduler = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
                                    max_model_len=max_model_len, eos_token_ids=frozenset(eos_ids(hf_config)))
        return EngineConfig(model=model_config, cache=cache, scheduler=scheduler, device=device,
                            enforce_eager=self.enforce_eager, seed=self.seed,
                            data_parallel_size=self.data_parallel_size), source

    def _check_parallel(self, device: str) -> None:
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        _check(isinstance(tp, int) and tp >= 1, "tensor_parallel_size", f"must be an integer >= 1, got {tp!r}")
        _check(isinstance(dp, int) and dp >= 1, "data_parallel_size", f"must be an integer >= 1, got {dp!r}")
        _check(self.data_parallel_backend in DP_BACKENDS, "data_parallel_backend",
               f"must be one of {', '.join(DP_BACKENDS)}, got {self.data_parallel_backend!r}")
        _check(self.routing in ROUTING_POLICIES, "routing",
               f"must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")
        if dp > 1 and self.core_process:
            raise ValueError("data_parallel_size > 1 always runs the engine cores in their own processes: "
                             "leave core_process unset")
        if self.data_parallel_backend == "ray" and dp > 1:
            require_ray()
            _check(not device.startswith("cuda:"), "device",
                   f"{device!r}: with data_parallel_backend 'ray' give 'cuda' (Ray gives each core its GPUs)")
            return    # the cores' GPUs are on the Ray nodes: the placement group checks them
        local_gpus = tp * dp
        if local_gpus > 1 and device.startswith("cuda"):
            name = "tensor_parallel_size" if dp == 1 else "data_parallel_size"
            _check(device == "cuda", name, f"uses GPUs 0..{local_gpus - 1} (CUDA_VISIBLE_DEVICES picks them): "
                                           f"give device 'cuda', not {device!r}")
            _check(local_gpus <= torch.cuda.device_count(), name,
                   f"{getattr(self, name)} needs {local_gpus} GPUs (one per rank of each core), but "
                   f"{torch.cuda.device_count()} are visible")

    def _dtype(self, device: str) -> str:
        if self.dtype == "auto":
            return "bfloat16" if device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[self.dtype]

    def _max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        if self.max_model_len is None:
            return limit
        _check(1 <= self.max_model_len <= limit, "max_model_len",
               f"must be in [1, {limit}] (the model's max_position_embeddings), got {self.max_model_len}")
        return self.max_model_len


def require_ray():
    """The ray module, or a ValueError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("data_parallel_backend 'ray' needs Ray: pip install 'pagedllm[ray]'") from None
    return ray


def eos_ids(hf_config) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _check_splittable(hf_config, tp: int) -> None:
    """Each rank must get whole attention heads and an equal share of the MLP; KV heads are split
    when they divide evenly and replicated when the ranks are a multiple of them."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    _check(heads % tp == 0, "tensor_parallel_size", f"{tp} must divide the model's {heads} attention heads")
    _check(kv_heads % tp == 0 or tp % kv_heads == 0, "tensor_parallel_size",
           f"{tp} must divide the model's {kv_heads} KV heads, or be a multiple of them")
    _check(hf_config.intermediate_size % tp == 0, "tensor_parallel_size",
           f"{tp} must divide the model's intermediate_size {hf_config.intermediate_size}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
