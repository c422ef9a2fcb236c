"""Greedy output token-for-token equal to Hugging Face transformers on the same weights, and
prompt / top logprobs within 1e-3 (float32)."""

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import random_prompts


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    llm = LLM(path, kv_cache_memory=16 << 20)
    prompts = random_prompts(4, 512, 3, 40, seed=7)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prompt_and_top_logprobs_match_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    llm = LLM(path, kv_cache_memory=16 << 20, max_num_batched_tokens=16)  # chunked prompt
    prompt = random_prompts(1, 512, 37, 37, seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    out = llm.generate([prompt], params)[0]
    tokens = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-3
        top_ids = ref[pos - 1].topk(5).indices.tolist()
        assert set(top_ids) <= set(entry)
    for i, step in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) + i - 1
        top = ref[pos].topk(5)
        for tid, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(step[tid].logprob - value) < 1e-3
        token = out.outputs[0].token_ids[i]
        assert step[token].rank == 1  # greedy picks the top token


def test_smollm_gguf_matches_hf(smollm):
    from transformers import AutoModelForCausalLM
    from pagedllm.models.loader import default_model_path
    import os
    folder, name = os.path.split(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = smollm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
             "1, 2, 3, 4,"]
    outputs = smollm.generate(texts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for text, out in zip(texts, outputs):
        prompt = tok(text).input_ids
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32), text
    assert "Paris" in outputs[0].outputs[0].text
