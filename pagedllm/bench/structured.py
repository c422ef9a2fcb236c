"""`pagedllm bench structured`: the cost of structured outputs. The nano prompts (or --num-prompts
of them) each generate under a modest, bounded JSON schema, then again without it, with the same
number of output tokens per request (ignore_eos): same work, masks or not. Reports both
throughputs and their ratio, how many constrained outputs finished (and were valid JSON for the
schema; the first invalid ones are kept) or hit the token limit, the grammar compile time, and the
grammar work per step (matcher advance and mask fill).

A dummy model needs a tokenizer for its grammars (`--tokenizer`, e.g. a folder saved from the
default model's): tokens outside that tokenizer's vocabulary are never allowed.
"""

import argparse
import json
import time
from typing import Annotated, Literal

import pydantic

from pagedllm.bench import results as res
from pagedllm.bench.throughput import sync
from pagedllm.bench.workloads import nano_requests
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams


class Record(pydantic.BaseModel):
    """The modest schema: every field bounded, so a valid output is at most a few hundred tokens."""
    model_config = pydantic.ConfigDict(extra="forbid")
    id: int = pydantic.Field(ge=0, le=100000)
    name: str = pydantic.Field(max_length=24)
    status: Literal["active", "inactive", "pending"]
    tags: list[Annotated[str, pydantic.StringConstraints(max_length=12)]] = pydantic.Field(max_length=4)
    scores: list[Annotated[int, pydantic.Field(ge=0, le=100)]] = pydantic.Field(max_length=8)


def _run(llm, prompts, params) -> tuple[list, float]:
    sync(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(llm)
    return outputs, time.perf_counter() - start


def _allocator_counts() -> tuple[int, int]:
    """The CUDA caching allocator's device allocations so far, and the times it had to give memory
    back (synchronising) to allocate (this process's: the engine core's when it runs here)."""
    import torch
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


def _valid(text: str) -> bool:
    try:
        Record.model_validate_json(text)
        return True
    except pydantic.ValidationError:
        return False


def cmd_structured(args: argparse.Namespace) -> None:
    from pagedllm import LLM
    from pagedllm.engine.engine_args import EngineArgs
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    engine = llm.llm_engine
    lo, hi = args.nano_len_range
    requests = nano_requests(engine.vocab_size, num=args.num_prompts, min_len=lo, max_len=hi)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    schema = StructuredOutputsParams(json=Record.model_json_schema())
    constrained = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, structured_outputs=schema)
    # warm-up: the grammar, both kinds of step at every batch size the runs reach (the sampling and
    # mask kernels' configs, which Triton compiles on first use; the allocator's first large blocks;
    # the batch sizes of a whole run's tail, as its requests finish one by one)
    _run(llm, prompts, constrained)
    _run(llm, prompts, SamplingParams(temperature=args.temperature, max_tokens=8, ignore_eos=True))
    rows, result = [], {**res.environment(), "benchmark": "structured", "model": engine.config.model.model,
                        "num_prompts": args.num_prompts, "len_range": [lo, hi], "output_len": args.output_len,
                        "temperature": args.temperature, "core_process": args.core_process,
                        "schema": Record.model_json_schema(), "repeats": [],
                        "first_compile_s": engine.get_stats()["grammar_compile_time"]}
    for repeat in range(args.repeats):
        engine.reset_prefix_cache()
        before, allocator = engine.get_stats(), _allocator_counts()
        outs, seconds = _run(llm, prompts, constrained)
        after = engine.get_stats()
        allocator = [None, None] if args.core_process else [b - a for a, b in zip(allocator, _allocator_counts())]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
        invalid = [c for c in finished if not _valid(c.text)]
        engine.reset_prefix_cache()
        same = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True) for n in lengths]
        _, plain_seconds = _run(llm, prompts, same)
        steps = after["num_steps"] - before["num_steps"]
        run = {"constrained_s": seconds, "unconstrained_s": plain_seconds, "output_tokens": sum(lengths),
               "constrained_tokens_per_s": sum(lengths) / seconds,
               "unconstrained_tokens_per_s": sum(lengths) / plain_seconds, "ratio": plain_seconds / seconds,
               "finished": len(finished), "valid_json_of_finished": len(finished) - len(invalid),
               "invalid_outputs": [{"text": c.text, "token_ids": list(c.token_ids)} for c in invalid[:5]],
               "hit_token_limit": sum(o.outputs[0].finish_reason == "length" for o in outs),
               "grammar_compile_s": after["grammar_compile_time"] - before["grammar_compile_time"],
               "mask_ms_per_step": 1e3 * (after["grammar_mask_time"] - before["grammar_mask_time"]) / max(1, steps),
               "steps": steps, "cuda_mallocs": allocator[0], "cuda_alloc_retries": allocator[1]}
        result["repeats"].append(run)
        rows.append({"run": f"repeat {repeat + 1}", **run})
        print(json.dumps(run), flush=True)
    result.update(rows[-1])
    result.pop("run")
    table = res.markdown_table(rows, ["run", "output_tokens", "constrained_tokens_per_s", "unconstrained_tokens_per_s",
                                      "ratio", "finished", "valid_json_of_finished", "hit_token_limit",
                                      "grammar_compile_s", "mask_ms_per_step"])
    res.save(result, args.output, table)
    llm.shutdown()


def add_parser(bench) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    p = bench.add_parser("structured", help="requests under a JSON schema vs the same requests unconstrained")
    EngineArgs.add_cli_args(p)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--nano-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--core-process", action="store_true",
                   help="run the engine core in its own process, as the server does (LLM(core_process=True))")
    p.add_argument("--output", default=None, help="path stem for the .json and .md results")
    p.set_defaults(func=cmd_structured)
