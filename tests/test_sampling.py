"""Sampler behaviour through the engine: seeds, top-k/p, penalties, stops, n, logprobs, bad input."""

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_no_leaks, random_prompts


@pytest.fixture(scope="module")
def tiny(tiny_models):
    path, _ = tiny_models["qwen3"]
    return LLM(path, max_model_len=256, kv_cache_memory=8 << 20)


def tokens(outputs):
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny):
    prompts = random_prompts(4, 512, 5, 30, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=42, ignore_eos=True)
    alone = tokens(tiny.generate(prompts[:1], params))
    batched = tokens(tiny.generate(prompts, [params] + [SamplingParams(temperature=1.0, max_tokens=16)] * 3))
    assert batched[0] == alone[0]
    assert tokens(tiny.generate(prompts[:1], SamplingParams(temperature=1.0, max_tokens=16, seed=43))) != alone


def test_top_k_one_equals_greedy(tiny):
    prompts = random_prompts(3, 512, 5, 30, seed=2)
    greedy = tokens(tiny.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    top1 = tokens(tiny.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True)))
    assert greedy == top1


def test_n_samples_share_prompt_blocks(tiny):
    prompt = random_prompts(1, 512, 40, 40, seed=3)[0]
    before = tiny.llm_engine.get_stats()["prefix_cache_hits"]
    out = tiny.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert tiny.llm_engine.get_stats()["prefix_cache_hits"] - before >= 2 * 32   # siblings reuse the prompt's full blocks
    assert_no_leaks(tiny)


def test_logit_bias_min_tokens_and_penalties(tiny):
    prompt = random_prompts(1, 512, 10, 10, seed=4)[0]
    out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={17: 100.0}))[0]
    assert out.outputs[0].token_ids == [17] * 6
    # with a huge repetition penalty, greedy never repeats a token it has seen
    out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1e9,
                                                 ignore_eos=True))[0]
    generated = out.outputs[0].token_ids
    assert len(set(generated)) == len(generated) and not set(generated) & set(prompt)
    eos = next(iter(tiny.llm_engine.config.scheduler.eos_token_ids), None)
    if eos is not None:
        out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=8,
                                                     logit_bias={eos: 100.0}))[0]
        assert len(out.outputs[0].token_ids) == 8 and eos not in out.outputs[0].token_ids[:7]


def test_stop_token_ids_and_finish_reasons(tiny):
    prompt = random_prompts(1, 512, 10, 10, seed=5)[0]
    free = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length"
    stop_at = free.token_ids[4]
    out = tiny.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_strings_across_tokens(smollm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    full = smollm.generate(["The capital of France is"], params)[0].outputs[0]
    # a stop string that starts inside one token and ends in the next
    tok = smollm.get_tokenizer()
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    stop = pieces[k][len(pieces[k - 1]) - 1:len(pieces[k - 1]) + 1]
    assert len(stop) == 2
    out = smollm.generate(["The capital of France is"],
                          SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    incl = smollm.generate(["The capital of France is"],
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop],
                                          include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == full.text[:full.text.index(stop) + 2]


def test_detokenized_text_matches_full_decode(smollm):
    out = smollm.generate(["Write a haiku about the sea:", "Привет! Как дела? 你好"],
                          SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True,
                                         output_kind="cumulative"))
    tok = smollm.get_tokenizer()
    for o in out:
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_chat_uses_template(smollm):
    out = smollm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=16))[0]
    assert "<|im_start|>assistant" in smollm.get_tokenizer().decode(out.prompt_token_ids)
    assert "Paris" in out.outputs[0].text


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(logprobs=21), "logprobs"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_before_scheduling(tiny):
    engine = tiny.llm_engine
    cases = [([], "empty"), (list(range(300)), "max_model_len"), ([1, 2, 99999], "vocabulary")]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny.generate([prompt], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        tiny.generate([[1, 2, 3]], SamplingParams(max_tokens=300))
    # a bad request in a list aborts nothing else and leaves no state behind
    with pytest.raises(ValueError):
        tiny.generate([[1, 2, 3], []], SamplingParams(max_tokens=4))
    assert not engine.output_processor.requests and not engine.has_unfinished_requests()
    assert_no_leaks(tiny)


def test_bad_models():
    with pytest.raises(ValueError, match="not found"):
        LLM("/nonexistent/model/path")
    with pytest.raises(ValueError, match="unsupported architecture"):
        import json, tempfile, os
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, f)
        LLM(folder)
