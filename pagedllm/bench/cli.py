"""`pagedllm bench ...`: benchmark subcommands, each writing a JSON result and a markdown table."""

import argparse

from pagedllm.bench import results, workloads
from pagedllm.bench.throughput import run_llm, run_sequential


def register(sub) -> None:
    from pagedllm.entrypoints.cli import add_engine_args
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput of N requests submitted at once")
    add_engine_args(tp)
    tp.add_argument("--workload", choices=["random", "nano"], default="random")
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--temperature", type=float, default=None,
                    help="default: 0.6 for nano, 0 (greedy) otherwise")
    tp.add_argument("--baseline", choices=["none", "sequential"], default="none",
                    help="also run the same requests one at a time, in the same process")
    tp.add_argument("--output", default=None, help="path stem for the .json and .md results")
    tp.set_defaults(func=cmd_throughput)


def cmd_throughput(args: argparse.Namespace) -> None:
    from pagedllm import LLM
    from pagedllm.entrypoints.cli import engine_kwargs
    kwargs = engine_kwargs(args)
    if args.workload == "nano" and args.max_model_len is None:
        kwargs["max_model_len"] = 4096
    llm = LLM(args.model, **kwargs)
    vocab = llm.engine.vocab_size
    if args.workload == "nano":
        reqs = workloads.nano_requests(vocab, num=args.num_prompts)
        temperature = 0.6 if args.temperature is None else args.temperature
    else:
        reqs = workloads.random_requests(args.num_prompts, args.input_len, args.output_len, vocab)
        temperature = 0.0 if args.temperature is None else args.temperature
    run_llm(llm, reqs[:2], temperature)   # warm-up
    rows = [{"mode": "pagedllm (all at once)", **run_llm(llm, reqs, temperature)}]
    result = {**results.environment(), "benchmark": "throughput", "workload": args.workload,
              "model": llm.engine.config.model.model, "dtype": llm.engine.config.model.dtype,
              "temperature": temperature, **rows[0]}
    if args.baseline == "sequential":
        rows.append({"mode": "one at a time", **run_sequential(llm, reqs, temperature)})
        result["baseline"] = {"name": "sequential", **rows[1]}
        result["speedup_vs_baseline"] = rows[0]["output_tokens_per_s"] / rows[1]["output_tokens_per_s"]
    table = results.markdown_table(rows, ["mode", "num_requests", "elapsed_s", "requests_per_s",
                                          "output_tokens_per_s", "total_tokens_per_s"])
    if "speedup_vs_baseline" in result:
        table += f"\n\nspeed-up over one at a time: {result['speedup_vs_baseline']:.2f}x"
    results.save(result, args.output, table)
