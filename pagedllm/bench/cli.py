"""`pagedllm bench ...`: benchmark subcommands, each writing a JSON result and a markdown table."""

import argparse
import gc

from pagedllm.bench import results, workloads
from pagedllm.bench.throughput import run_llm, run_llm_roofline, run_sequential


def register(sub) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    add_engine_args = EngineArgs.add_cli_args
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput of N requests submitted at once")
    add_engine_args(tp)
    tp.add_argument("--workload", choices=["random", "nano"], default="random")
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--nano-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                    help="nano workload: input and output lengths uniform in [MIN, MAX] (default 100 1024)")
    tp.add_argument("--temperature", type=float, default=None,
                    help="default: 0.6 for nano, 0 (greedy) otherwise")
    tp.add_argument("--baseline", choices=["none", "sequential", "hf", "all"], default="none",
                    help="sequential: the same requests one at a time; hf: through Hugging Face transformers "
                         "(padded-batch generate + continuous batching) on the same weights; all: both; "
                         "each in the same process")
    tp.add_argument("--hf-batch-size", type=int, default=None, help="HF generate batch (default 128 GPU, 8 CPU)")
    tp.add_argument("--hf-max-requests", type=int, default=None,
                    help="run only the first N requests through HF (recorded in the JSON)")
    tp.add_argument("--hf-continuous", action=argparse.BooleanOptionalAction, default=True,
                    help="also try transformers' continuous batching (generate_batch)")
    tp.add_argument("--hf-timeout", type=float, default=1800,
                    help="give up on HF continuous batching after this many seconds (recorded as an error)")
    tp.add_argument("--core-process", action="store_true",
                    help="run the engine core in its own process, as the server does (LLM(core_process=True))")
    tp.add_argument("--output", default=None, help="path stem for the .json, .md and .png results")
    tp.set_defaults(func=cmd_throughput)

    from pagedllm.bench import data_parallel, serve, serve_vs_offline, stress, structured
    serve.add_parser(bench)
    serve_vs_offline.add_parser(bench)
    data_parallel.add_parser(bench)
    structured.add_parser(bench)
    stress.add_parser(bench)

    lat = bench.add_parser("latency", help="one request: TTFT and mean time per output token")
    add_engine_args(lat)
    lat.add_argument("--input-len", type=int, default=512)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--core-process", action="store_true", help="run the engine core in its own process")
    lat.add_argument("--output", default=None, help="path stem for the .json, .md and .png results")
    lat.set_defaults(func=cmd_latency)

    pf = bench.add_parser("prefix", help="shared-prefix workload, prefix caching on vs off")
    add_engine_args(pf)
    pf.add_argument("--num-prefixes", type=int, default=10)
    pf.add_argument("--prefix-len", type=int, default=768)
    pf.add_argument("--unique-len", type=int, default=256)
    pf.add_argument("--per-prefix", type=int, default=10, help="requests per system prompt")
    pf.add_argument("--output-len", type=int, default=128)
    pf.add_argument("--seed-workload", type=int, default=0)
    pf.add_argument("--repeats", type=int, default=2,
                    help="timed runs per mode, each from an empty cache; the last is reported")
    pf.add_argument("--output", default=None, help="path stem for the .json, .md and .png results")
    pf.set_defaults(func=cmd_prefix)


def _engine(args, **overrides):
    from pagedllm import LLM
    from pagedllm.engine.engine_args import EngineArgs
    return LLM(**vars(EngineArgs.from_cli_args(args, **overrides)))


def _bandwidth(args) -> dict:
    """Measured before the engine is built, so the copy buffers never compete with the KV pool."""
    import torch
    from pagedllm.bench.roofline import measure_bandwidth
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return measure_bandwidth(device)


def _limits(args) -> dict:
    """The device's bandwidth and its matmul peak in the engine's dtype, before the engine is built."""
    import torch
    from pagedllm.bench.roofline import measure_peak_flops
    from pagedllm.engine.engine_args import EngineArgs
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, EngineArgs.from_cli_args(args)._dtype(device))
    return {**_bandwidth(args), **measure_peak_flops(device, dtype)}




def _free_cuda() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _plot(kind: str, result: dict, output: str | None) -> None:
    if not output:
        return
    from pagedllm.bench import plots
    try:
        getattr(plots, f"{kind}_plot")(result, output)
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the result
        print(f"plot failed: {type(exc).__name__}: {exc}")


def cmd_throughput(args: argparse.Namespace) -> None:
    if args.baseline in ("hf", "all") and args.tensor_parallel_size > 1:
        raise SystemExit("--baseline hf copies the engine's weights: it needs --tensor-parallel-size 1")
    overrides = {}
    if args.workload == "nano" and args.max_model_len is None:
        overrides["max_model_len"] = 4096
    bw = _limits(args)
    llm = _engine(args, **overrides)
    vocab = llm.llm_engine.vocab_size
    if args.workload == "nano":
        lo, hi = args.nano_len_range
        reqs = workloads.nano_requests(vocab, num=args.num_prompts, min_len=lo, max_len=hi)
        temperature = 0.6 if args.temperature is None else args.temperature
    else:
        reqs = workloads.random_requests(args.num_prompts, args.input_len, args.output_len, vocab)
        temperature = 0.0 if args.temperature is None else args.temperature
    device = llm.llm_engine.config.device
    run_llm(llm, reqs[:2], temperature)   # warm-up
    llm.llm_engine.reset_prefix_cache()   # the warm-up prompts must not be cache hits in the timed run
    rows = [{"mode": "pagedllm (all at once)", **run_llm_roofline(llm, reqs, temperature, bw["bandwidth_bytes_per_s"],
                                                                  bw["peak_flops_per_s"])}]
    result = {**results.environment(), "benchmark": "throughput", "workload": args.workload,
              "workload_params": ({"num_prompts": args.num_prompts, "len_range": list(args.nano_len_range)}
                                  if args.workload == "nano" else
                                  {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                   "output_len": args.output_len}),
              "model": llm.llm_engine.config.model.model, "dtype": llm.llm_engine.config.model.dtype,
              "device_str": device, "temperature": temperature, **bw, **rows[0], "baselines": {}}
    result.pop("mode")
    if args.baseline in ("sequential", "all"):
        seq = run_sequential(llm, reqs, temperature)
        rows.append({"mode": "one at a time", **seq})
        result["baselines"]["sequential"] = {"name": "sequential", **seq}
    if args.baseline in ("hf", "all"):
        from pagedllm.bench import hf_baseline
        hf_reqs = reqs[:args.hf_max_requests] if args.hf_max_requests else reqs
        batch = args.hf_batch_size or (128 if device.startswith("cuda") else 8)
        note = (f"HF ran the first {len(hf_reqs)} of {len(reqs)} requests (--hf-max-requests)"
                if len(hf_reqs) < len(reqs) else f"HF ran all {len(reqs)} requests")
        result["hf"] = {"status": "running", "num_requests": len(hf_reqs), "note": note}
        # save what we have: the HF part is slow and may be killed by an outer time limit
        _finish_throughput(args, result, rows, partial=True)
        hf = hf_baseline.build_hf_model(llm)
        del llm   # the engine (and its KV pool) goes before HF runs
        _free_cuda()
        import torch
        if torch.cuda.is_available():
            allocated = torch.cuda.memory_allocated()
            result["hf"]["cuda_memory_allocated_before_hf"] = allocated
            print(f"CUDA memory allocated after freeing the engine (HF model included): {allocated / 2**30:.2f} GiB")
        result["hf"].update(weights="copied from the pagedllm engine's model (fused qkv/gate_up split back)",
                            model_class=type(hf).__name__)
        hf_baseline.run_hf_generate(hf, [workloads.BenchRequest(r.prompt_token_ids[:16], 2) for r in hf_reqs[:2]],
                                    temperature, 2)   # warm-up
        modes = [("generate", "hf generate", lambda: hf_baseline.run_hf_generate(hf, hf_reqs, temperature, batch))]
        if args.hf_continuous:
            modes.append(("continuous_batching", "hf continuous",
                          lambda: hf_baseline.run_hf_continuous(hf, hf_reqs, temperature, args.hf_timeout)))
        for key, label, fn in modes:
            try:
                entry = fn()
                rows.append({"mode": entry["name"], **{k: v for k, v in entry.items() if k != "name"}})
            except Exception as exc:  # noqa: BLE001 - a baseline failure must not lose the main result
                import traceback
                entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
                rows.append({"mode": f"{label} FAILED: {entry['error'][:80]}"})
                _free_cuda()
            result["hf"][key] = entry
            result["baselines"][label] = entry
            _finish_throughput(args, result, rows, partial=True)
        result["hf"]["status"] = "done"
        del hf
        _free_cuda()
    _finish_throughput(args, result, rows)


def _finish_throughput(args, result: dict, rows: list[dict], partial: bool = False) -> None:
    ok = {k: v for k, v in result["baselines"].items() if v.get("output_tokens_per_s")}
    if ok:
        # the primary baseline: the fastest one that ran (the most conservative speed-up)
        name, best = max(ok.items(), key=lambda kv: kv[1]["output_tokens_per_s"])
        result["baseline"] = {"name": name, "output_tokens_per_s": best["output_tokens_per_s"]}
        result["speedup_vs_baseline"] = result["output_tokens_per_s"] / best["output_tokens_per_s"]
        for k, v in ok.items():
            result[f"speedup_vs_{k.replace(' ', '_')}"] = result["output_tokens_per_s"] / v["output_tokens_per_s"]
    table = results.markdown_table(rows, ["mode", "num_requests", "elapsed_s", "requests_per_s",
                                          "output_tokens_per_s", "total_tokens_per_s"])
    table += (f"\n\nroofline: bandwidth {result['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s, weights "
              f"{result['weight_bytes'] / 1e9:.3f} GB, KV {result['kv_bytes_per_token']:,} B/token, "
              f"{result['decode_steps']} decode steps, ideal {result['ideal_time_s']:.2f} s "
              f"({result['ideal_output_tokens_per_s']:,.0f} tok/s), roofline_fraction "
              f"{result['roofline_fraction']:.3f}; with compute (peak {result['peak_flops_per_s'] / 1e12:,.1f} "
              f"TFLOP/s, {result['flops'] / 1e12:,.1f} TFLOP): ideal {result['ideal_time_combined_s']:.2f} s, "
              f"roofline_fraction_combined {result['roofline_fraction_combined']:.3f}")
    for k, v in ok.items():
        table += f"\n\nspeed-up over {k}: {result['output_tokens_per_s'] / v['output_tokens_per_s']:.2f}x"
    if "hf" in result:
        table += f"\n\n{result['hf']['note']}"
    if partial:
        table += "\n\n(partial result: the HF baseline is still running)"
    results.save(result, args.output, table)
    if not partial:
        _plot("throughput", result, args.output)


def cmd_latency(args: argparse.Namespace) -> None:
    from pagedllm.bench.latency import run_latency
    bw = _limits(args)
    llm = _engine(args)
    lat = run_latency(llm, args.input_len, args.output_len, args.repeats, bandwidth=bw["bandwidth_bytes_per_s"],
                      peak_flops=bw["peak_flops_per_s"])
    result = {**results.environment(), "benchmark": "latency", "workload": "latency",
              "model": llm.llm_engine.config.model.model, "dtype": llm.llm_engine.config.model.dtype,
              "device_str": llm.llm_engine.config.device, "enforce_eager": args.enforce_eager, **bw, **lat}
    table = results.markdown_table([result], ["workload", "prompt_len", "output_len", "ttft_ms", "tpot_ms",
                                              "ideal_tpot_ms", "output_tokens_per_s", "roofline_fraction",
                                              "roofline_fraction_combined"])
    results.save(result, args.output, table)
    _plot("latency", result, args.output)


def cmd_prefix(args: argparse.Namespace) -> None:
    from pagedllm.bench.prefix import run_prefix_mode

    def make(enable: bool):
        return _engine(args, enable_prefix_caching=enable)

    bw = _bandwidth(args)
    on = run_prefix_mode(make, True, args, bw["bandwidth_bytes_per_s"])
    off = run_prefix_mode(make, False, args, bw["bandwidth_bytes_per_s"])
    speedup = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    result = {**results.environment(), "benchmark": "prefix", "workload": "prefix", **bw,
              "model": on.pop("model"), "dtype": on.pop("dtype"), "device_str": on.pop("device_str"),
              "num_prefixes": args.num_prefixes, "prefix_len": args.prefix_len, "unique_len": args.unique_len,
              "per_prefix": args.per_prefix, "output_len": args.output_len,
              "output_tokens_per_s": on["output_tokens_per_s"], "roofline_fraction": on["roofline_fraction"],
              "hit_rate": on["hit_rate"], "speedup": speedup,
              "baseline": {"name": "prefix caching off", "output_tokens_per_s": off["output_tokens_per_s"],
                           "roofline_fraction": off["roofline_fraction"]},
              "on": on, "off": {k: v for k, v in off.items() if k not in ("model", "dtype", "device_str")}}
    rows = [{"mode": "prefix caching on", **on}, {"mode": "prefix caching off", **result["off"]}]
    table = results.markdown_table(rows, ["mode", "num_requests", "elapsed_s", "output_tokens_per_s",
                                          "total_tokens_per_s", "hit_rate", "roofline_fraction"])
    table += f"\n\nspeed-up with prefix caching: {speedup:.2f}x (hit rate {on['hit_rate']:.1%} of prompt tokens)"
    results.save(result, args.output, table)
    _plot("prefix", result, args.output)
