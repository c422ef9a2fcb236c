"""GPU correctness (runs only where CUDA is available; CI has no GPU, so these skip there).

- float32: greedy output token-for-token equal to Hugging Face transformers on the same random
  Qwen3-0.6B weights (Triton kernels + CUDA graphs against HF's own attention).
- float32 with shared system prompts: the same, with decode steps reading the shared prefixes
  through cascade attention (tiles of sequences, worker/shared_prefix.py).
- bfloat16: CUDA-graph decoding equal to eager decoding for the first 32 tokens of several prompts.
"""

import gc
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.kernels.triton import pdl
from pagedllm.worker import model_runner
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QWEN3_CONFIG = Path(__file__).parent.parent / "pagedllm" / "data" / "qwen3-0.6b-config.json"


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    """Random Qwen3-0.6B weights saved as a local HF folder (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = tmp_path_factory.mktemp("qwen3-0.6b-random")
    config = AutoConfig.from_pretrained(str(QWEN3_CONFIG))
    config.initializer_range = 0.1   # spread the logits: fewer near-ties for greedy to trip on
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return str(path), model


def _hf_greedy_check(hf, prompts, ours) -> None:
    hf = hf.cuda().eval()
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
    hf.cpu()
    free_gpu()


def test_float32_greedy_matches_hf(qwen3_checkpoint):
    path, hf = qwen3_checkpoint
    prompts = random_prompts(6, 151936, 20, 300, seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(path, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=16)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    del llm
    free_gpu()
    _hf_greedy_check(hf, prompts, ours)


def test_float32_cascade_decode_matches_hf(qwen3_checkpoint, monkeypatch):
    """Two system prompts of 320 tokens x 3 requests; the second round finds them cached."""
    path, hf = qwen3_checkpoint
    systems = random_prompts(2, 151936, 320, 320, seed=4)
    prompts = [systems[i % 2] + tail for i, tail in enumerate(random_prompts(6, 151936, 5, 60, seed=5))]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plans = []

    def recording(*args, **kwargs):
        plans.append(plan_shared_prefixes(*args, **kwargs))
        return plans[-1]
    plan_shared_prefixes = model_runner.plan_shared_prefixes
    monkeypatch.setattr(model_runner, "plan_shared_prefixes", recording)
    llm = LLM(path, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=16)
    rounds = [[o.outputs[0].token_ids for o in llm.generate(prompts, params)] for _ in range(2)]
    del llm
    free_gpu()
    assert rounds[0] == rounds[1]
    assert any(p is not None and p.tile_lens.max() == 320 for p in plans)
    _hf_greedy_check(hf, prompts, rounds[0])


def _agreement(reference: list, outputs: list, tie: float = 0.125) -> tuple[int, int]:
    """(tokens identical before any divergence, prompts identical throughout), asserting that each
    divergence follows a near-tie in the reference: bf16 logits of magnitude 8..16 are spaced 0.0625
    apart, so top-2 logprobs within `tie` are a tie that other rounding may break either way."""
    equal = whole = 0
    for ref, got in zip(reference, outputs, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)) if a != b), len(ref.token_ids))
        equal += k
        whole += k == len(ref.token_ids)
        if k < len(ref.token_ids):
            top2 = sorted((lp.logprob for lp in ref.logprobs[k].values()), reverse=True)[:2]
            assert top2[0] - top2[1] <= tie, f"diverged at token {k} without a near-tie: {top2}"
    return equal, whole


def test_bf16_cuda_graphs_match_eager(qwen3_checkpoint):
    """Identical greedy tokens, except where the eager run itself had a near-tie: bf16 matrix
    products may pick other algorithms inside a graph capture, moving logits by bf16 rounding."""
    path, _ = qwen3_checkpoint
    prompts = random_prompts(8, 151936, 10, 500, seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    outputs = {}
    for eager in (True, False):
        llm = LLM(path, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3,
                  enforce_eager=eager, max_num_seqs=32)
        assert llm.llm_engine.model_info()["cuda_graphs"] != eager
        outputs[eager] = [o.outputs[0] for o in llm.generate(prompts, params)]
        del llm
        free_gpu()
    equal, whole = _agreement(outputs[True], outputs[False])
    print(f"bf16 graph vs eager: {equal} of {32 * len(prompts)} tokens identical before any divergence, "
          f"{whole} of {len(prompts)} prompts identical for all 32")
    assert equal >= 0.5 * 32 * len(prompts)   # H100, 2026-11-25: 185 of 256 before a near-tie
    assert whole >= 3                         # the issue: equal for 32 tokens of several prompts


def test_bf16_batch_of_one_matches_a_batch(qwen3_checkpoint, monkeypatch):
    """A request decoding alone takes batch 1's own kernels (skinny GEMMs, the one-row RMSNorm, and on
    Hopper every kernel of the step chained by programmatic dependent launch) inside its CUDA graph.
    PDL changes when kernels start, never what they compute: with and without it, the same tokens and
    the same logprobs, bit for bit (a kernel reading its input before the previous one wrote it would
    show here). Against the same prompts decoded together (cuBLAS), the same tokens but after near-ties.
    Prefix caching is off: a prompt found in the cache recomputes only its last block, and that alone
    moves bf16 logits (on the H200, by up to 0.3 in logprob within 32 tokens)."""
    path, _ = qwen3_checkpoint
    prompts = random_prompts(8, 151936, 10, 500, seed=3)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    kwargs = dict(dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=32,
                  enable_prefix_caching=False)
    runs = {}
    for chained in (True, False):
        monkeypatch.setattr(pdl, "enabled", pdl.enabled if chained else lambda device: False)
        llm = LLM(path, **kwargs)
        if chained:
            runs["together"] = [o.outputs[0] for o in llm.generate(prompts, params)]
        runs[chained] = [llm.generate([prompt], params)[0].outputs[0] for prompt in prompts]
        del llm
        free_gpu()
    for with_pdl, without in zip(runs[True], runs[False]):
        assert with_pdl.token_ids == without.token_ids
        assert [{t: lp.logprob for t, lp in d.items()} for d in with_pdl.logprobs] == \
            [{t: lp.logprob for t, lp in d.items()} for d in without.logprobs]
    equal, whole = _agreement(runs["together"], runs[True], tie=0.25)
    print(f"bf16 batch 1 vs batch 8: {equal} of {32 * len(prompts)} tokens identical before any divergence, "
          f"{whole} of {len(prompts)} prompts identical for all 32")
    assert equal >= 0.25 * 32 * len(prompts)   # H200, 2026-11-30: 98 of 256 (a wrong kernel: a few)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_generate_what_one_does():
    """Qwen3-0.6B dummy weights in float32 over 2 GPUs (NCCL) against one GPU: greedy tokens equal,
    with prefix caching hitting and a pool small enough to preempt."""
    prefixes = random_prompts(3, 151936, 300, 300, seed=3)
    tails = random_prompts(9, 151936, 5, 60, seed=4)
    prompts = [prefixes[i % 3] + t for i, t in enumerate(tails)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    common = dict(load_format="dummy", dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3,
                  max_num_seqs=16)
    one = LLM(str(QWEN3_CONFIG), **common)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    del one
    free_gpu()
    two = LLM(str(QWEN3_CONFIG), tensor_parallel_size=2, num_gpu_blocks_override=64, **common)
    try:
        assert two.llm_engine.model_info()["cuda_graphs"]   # NCCL all-reduces inside the captured decode graphs
        for _ in range(2):
            assert [o.outputs[0].token_ids for o in two.generate(prompts, params)] == expected
        stats = two.llm_engine.get_stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    finally:
        two.shutdown()
    del two
    free_gpu()
