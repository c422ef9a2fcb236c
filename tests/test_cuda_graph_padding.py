"""The CUDA-graph path's input handling, on CPU: every step goes through CudaGraphs.run (static
buffers, padding to the bucket, padded sequences with no query rows), with each "graph" replaced by
an eager run of the model on the padded bucket. Greedy outputs must equal the plain eager engine's.
The real capture and replay run in tests/test_gpu.py."""

from pagedllm import LLM, SamplingParams
from pagedllm.worker.cuda_graphs import CudaGraphs, bucket_sizes
from tests.conftest import assert_no_leaks, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class EagerBucket:
    """Stands in for a captured graph: runs the model on the whole padded bucket."""

    def __init__(self, graphs: CudaGraphs, kind: str, size: int) -> None:
        self.graphs, self.kind, self.size = graphs, kind, size
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.graphs.static.hidden[:self.size] = self.graphs.model(*self.graphs.model_args(self.kind, self.size))


def _with_eager_buckets(llm: LLM) -> list[EagerBucket]:
    runner = llm.llm_engine.model_runner
    sched = llm.llm_engine.config.scheduler
    graphs = CudaGraphs(runner.model, runner.hf_config.hidden_size, runner.dtype, runner.device,
                        sched.max_num_seqs, sched.max_num_batched_tokens, runner.max_model_len, runner.block_size,
                        runner.shared_tile_size)
    buckets = []
    for kind, sizes in graphs.sizes.items():
        for size in sizes:
            graphs.graphs[kind][size] = EagerBucket(graphs, kind, size)
            buckets.append(graphs.graphs[kind][size])
    runner.graphs = graphs
    return buckets


def test_bucket_sizes():
    assert bucket_sizes([1, 2, 4, 8], 3) == [1, 2, 3]
    assert bucket_sizes([1, 2, 4, 8], 8) == [1, 2, 4, 8]
    assert bucket_sizes([1, 2, 4, 8], 20) == [1, 2, 4, 8]   # beyond the table: eager


def test_padded_buckets_give_the_eager_outputs(tiny_models):
    path, _ = tiny_models["qwen3"]
    base = random_prompts(2, 512, 40, 40, seed=21)
    prompts = [base[i % 2] + t for i, t in enumerate(random_prompts(5, 512, 3, 30, seed=22))]
    prompts += random_prompts(3, 512, 5, 90, seed=23)
    kwargs = dict(max_model_len=160, max_num_batched_tokens=96, max_num_seqs=6, kv_cache_memory=16 << 20)
    expected = [o.outputs[0].token_ids for o in LLM(path, **kwargs).generate(prompts, GREEDY)]
    llm = LLM(path, **kwargs)
    buckets = _with_eager_buckets(llm)
    for _ in range(2):   # the second round hits the prefix cache: chunks after cached prefixes
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
    used = {(b.kind, b.size) for b in buckets if b.replays}
    assert {kind for kind, _ in used} == {"decode", "mixed"}
    assert any(kind == "decode" and size < 6 for kind, size in used)   # a batch padded up to a bucket
    assert ("mixed", 96) in used and any(kind == "mixed" and size < 96 for kind, size in used)
    assert llm.llm_engine.get_stats()["prefix_cache_hits"] > 0
    assert_no_leaks(llm)
