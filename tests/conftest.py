"""Shared fixtures: tiny random Hugging Face checkpoints (Llama, Qwen2, Qwen3) saved to disk, and
the bundled SmolLM2 GGUF loaded once per session.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
anything imports triton (`import torch` does not; building a model does, through torch._dynamo):
Triton's own helpers such as tl.zeros are decorated when triton is imported, and since Triton 3.8
the interpreter no longer converts ones decorated without it."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# One GGUF cache (models/gguf_cache.py) for the whole session and the servers it starts, not the user's
if "PAGEDLLM_CACHE_DIR" not in os.environ:
    os.environ["PAGEDLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="pagedllm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PAGEDLLM_CACHE_DIR"], ignore_errors=True)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6,
            initializer_range=0.5)


def make_tiny_checkpoint(path, arch: str):
    """Save a random HF model of `arch` (llama | qwen2 | qwen3) as a local folder; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    kinds = {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False,
                                                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                                       "factor": 8.0, "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 64})),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=16)),
    }
    config_cls, model_cls, extra = kinds[arch]
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[arch])
    config = config_cls(**TINY, **extra)
    model = model_cls(config).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, HF reference model)."""
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (str(path), make_tiny_checkpoint(path, arch))
    return out


@pytest.fixture(scope="session")
def smollm():
    """The default model (bundled SmolLM2-135M-Instruct GGUF) in float32, loaded once."""
    from pagedllm import LLM
    return LLM(max_model_len=1024, kv_cache_memory=256 << 20)


def random_prompts(num: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_no_leaks(llm) -> None:
    """Every block is free (cached-but-free counts as free) and the pool's invariants hold (the
    engine core checks them)."""
    kv = llm.llm_engine.kv_cache_state()
    assert kv["num_free_blocks"] == kv["num_blocks"], f"{kv['num_blocks'] - kv['num_free_blocks']} blocks leaked"
    assert kv["num_unfinished"] == 0
    assert not llm.llm_engine.has_unfinished_requests()


def core_of(llm):
    """The EngineCore of an LLM whose core runs in this process (white-box tests)."""
    return llm.llm_engine.engine_core.core
