"""The GGUF cache (models/gguf_cache.py): a GGUF's config, tokenizer and tensor index parsed once,
then read back without parsing the file's metadata, giving what transformers and gguf give."""


import gguf
import numpy as np
import pytest

from pagedllm.models import gguf_cache, loader


@pytest.fixture(scope="module")
def source():
    src = loader.resolve(None)
    loader.load_config(src)                      # builds the folder in the session's cache if needed
    gguf_cache.tensors(src.gguf_file)            # and the tensor index
    return src


def test_loads_read_the_cache_not_the_gguf_metadata(source, monkeypatch):
    def parse(*args, **kwargs):
        raise AssertionError("the GGUF's metadata was parsed again")
    monkeypatch.setattr(gguf, "GGUFReader", parse)
    monkeypatch.setattr("transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint", parse)
    config = loader.load_config(source)
    assert config.architectures == ["LlamaForCausalLM"] and config.hidden_size == 576
    assert loader.load_tokenizer(source).encode("Hello") and len(gguf_cache.tensors(source.gguf_file)) == 272


def test_the_cached_tokenizer_and_tensors_equal_the_gguf_readers(source):
    direct = gguf_cache.read_tokenizer(source.gguf_file)
    cached = loader.load_tokenizer(source)
    for text in ["The capital of France is", "Ünïcödé ✓ 12345\n\t  spaces", "<|im_start|>user\nhi<|im_end|>"]:
        assert cached.encode(text) == direct.encode(text)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2 + 2?"}]
    assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        direct.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (cached.eos_token, cached.bos_token, len(cached)) == (direct.eos_token, direct.bos_token, len(direct))
    reader = gguf.GGUFReader(source.gguf_file).tensors
    indexed = gguf_cache.tensors(source.gguf_file)
    assert [(t.name, int(t.tensor_type)) for t in reader] == [(n, kind) for n, kind, _ in indexed]
    for i in (0, 1, len(reader) - 1):
        assert np.array_equal(indexed[i][2], reader[i].data) and indexed[i][2].dtype == reader[i].data.dtype


def test_an_unwritable_cache_leaves_loading_to_the_gguf(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(blocker))
    assert gguf_cache.hf_folder(loader.default_model_path(), loader.GGUF_ARCHITECTURES) is None


def test_the_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    first = gguf_cache.folder_for(str(model))
    model.write_bytes(b"xy")
    assert gguf_cache.folder_for(str(model)) != first and first.parent == tmp_path / "gguf"
