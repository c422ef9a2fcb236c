"""`pagedllm bench data-parallel`: what several engine cores behind one server give, in one command
on one host.

Three servers, one after the other, with the same engine flags and --api-server-count API processes
(two by default): one core; --data-parallel-size N with prefix routing; N with round-robin routing.
Each gets, all at once and streamed (the aiohttp client in --client-processes processes):
  nano     the offline nano workload's 256 requests;
  tenants  a multi-tenant shared-prefix workload: --num-tenants system prompts of --prefix-len
           tokens, --per-tenant requests each with --unique-len tokens of their own and
           --output-len output tokens, in a shuffled order (in system-prompt order, round-robin
           over N cores would keep each prompt on one core by accident).
The prefix cache is reset before each run; the hit rate is the servers' own
vllm:prefix_cache_hits / queries over the run (all cores added up), beside each core's computed
(uncached) prompt tokens and the preemptions. With --repeats, each workload
runs that many times on each server and the results give the median-throughput run.
"""

import argparse
import os
import random
import re

from pagedllm.bench import results as res
from pagedllm.bench.serve import ClientConfig, benchmark, served_model
from pagedllm.bench.serve_vs_offline import post, start_server, stop_server
from pagedllm.bench.stress import metric_samples
from pagedllm.bench.workloads import BenchRequest, nano_requests, prefix_requests
from pagedllm.engine.router import ROUTING_POLICIES


def add_tenant_args(parser: argparse.ArgumentParser) -> None:
    """The tenants workload's shape (tenant_requests reads these)."""
    parser.add_argument("--num-tenants", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--unique-len", type=int, default=128)
    parser.add_argument("--per-tenant", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)


def tenant_requests(args, vocab: int) -> list[BenchRequest]:
    """The tenants workload, shuffled (benchmarks/routing_replay.py replays the same list)."""
    requests = prefix_requests(vocab, num_prefixes=args.num_tenants, prefix_len=args.prefix_len,
                               unique_len=args.unique_len, per_prefix=args.per_tenant, output_len=args.output_len,
                               seed=1)
    random.Random(2).shuffle(requests)
    return requests


def _core_counters(url: str) -> dict[str, dict[str, float]]:
    """Each core's prefix-cache hits and queries (in tokens) and preemptions, from /metrics: what
    routing changes. Keyed by the `engine` label."""
    names = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total": "queries",
             "vllm:num_preemptions_total": "preemptions"}
    cores: dict[str, dict[str, float]] = {}
    for name, labels, value in metric_samples(url):
        engine = re.search(r'engine="([^"]*)"', labels)
        if name in names and engine:
            counts = cores.setdefault(engine.group(1), dict.fromkeys(names.values(), 0.0))
            counts[names[name]] += value
    return cores


def _routing_effect(before: dict, after: dict) -> dict:
    """The run's hit rate (every core added up), preemptions, and each core's computed (not cached)
    prompt tokens, which show both the work routing saved and how evenly it spread the load."""
    delta = {core: {k: after[core][k] - before.get(core, {}).get(k, 0.0) for k in counts}
             for core, counts in sorted(after.items(), key=lambda item: int(item[0]))}
    queries = sum(d["queries"] for d in delta.values())
    return {"hit_rate": sum(d["hits"] for d in delta.values()) / max(1.0, queries),
            "preemptions": int(sum(d["preemptions"] for d in delta.values())),
            "computed_prompt_tokens": [int(d["queries"] - d["hits"]) for d in delta.values()]}


def _cpu_seconds(pid: int | None) -> float | None:
    """A process's user + system CPU time (Linux /proc; None elsewhere or without a pid)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured_run(cfg, url: str, api_pid: int | None, requests: list[BenchRequest], processes: int) -> dict:
    """One run of a workload from an empty prefix cache, with the hit rate over it and the API
    process's CPU time (near the run's duration: the front end, not the engines, set the pace;
    measured with one API process, which is the server's own process)."""
    post(url + "/reset_prefix_cache")
    counters = _core_counters(url)
    cpu = _cpu_seconds(api_pid)
    run = benchmark(cfg, requests, processes)
    cpu_after = _cpu_seconds(api_pid)
    run.update(_routing_effect(counters, _core_counters(url)))
    if cpu is not None and cpu_after is not None:
        run["api_cpu_s"] = cpu_after - cpu
    return run


def _median_run(repeats: list[dict]) -> dict:
    """The run of median throughput (a tenants run lasts about a second, so one run is noisy), with
    every run's throughput, hit rate and TTFT beside it."""
    ranked = sorted(repeats, key=lambda run: run["output_throughput"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    keys = ("output_throughput", "hit_rate", "preemptions", "computed_prompt_tokens", "p50_ttft_ms", "duration_s",
            "api_cpu_s", "failed")
    median["repeats"] = [{key: run.get(key) for key in keys} for run in repeats]
    return median


def _serve_runs(args, workloads: dict, dp: int, routing: str) -> dict:
    from pagedllm.distributed.parallel_state import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, args.api_server_count, port, data_parallel_size=dp, routing=routing)
    runs = {}
    try:
        cfg = ClientConfig(url + "/v1", served_model(url + "/v1", None), None, True, args.temperature, True,
                           args.timeout)
        benchmark(cfg, next(iter(workloads.values()))[:2 * dp])   # warm-up
        api_pid = proc.pid if args.api_server_count == 1 else None
        for name, requests in workloads.items():
            repeats = [_measured_run(cfg, url, api_pid, requests, args.client_processes) for _ in range(args.repeats)]
            for run in repeats:
                cpu = f", API process CPU {run['api_cpu_s']:.2f} s" if "api_cpu_s" in run else ""
                print(f"dp={dp} routing={routing} {name}: {run['output_throughput']:,.0f} tok/s in "
                      f"{run['duration_s']:.2f} s{cpu}, hit rate {run['hit_rate']:.3f}, preemptions {run['preemptions']}, "
                      f"computed prompt tokens per core {run['computed_prompt_tokens']}, failed {run['failed']}",
                      flush=True)
            runs[name] = _median_run(repeats)
    finally:
        runs["server_exit_code"] = stop_server(proc)
    return runs


def cmd_data_parallel(args: argparse.Namespace) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    dp = args.data_parallel_size
    if dp < 2:
        raise ValueError("data_parallel_size must be >= 2 (the comparison is against one core)")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    vocab = EngineArgs.from_cli_args(args, data_parallel_size=1).create_config()[0].model.hf_config.vocab_size
    lo, hi = args.nano_len_range
    workloads = {"nano": nano_requests(vocab, num=args.num_prompts, min_len=lo, max_len=hi),
                 "tenants": tenant_requests(args, vocab)}
    workloads = {name: workloads[name] for name in args.workloads}
    servers = {"1 core": _serve_runs(args, workloads, 1, "prefix")}
    for routing in args.routings:
        servers[f"{dp} cores, {routing}"] = _serve_runs(args, workloads, dp, routing)
    base = servers["1 core"]
    rows = []
    for server, runs in servers.items():
        for name in workloads:
            run = runs[name]
            run["speedup_vs_one_core"] = run["output_throughput"] / base[name]["output_throughput"]
            spread = [r["output_throughput"] for r in run["repeats"]]
            rows.append({"server": server, "workload": name, "output_tokens_per_s": run["output_throughput"],
                         "runs_tokens_per_s": f"{min(spread):,.0f}-{max(spread):,.0f}",
                         "speedup_vs_one_core": run["speedup_vs_one_core"], "hit_rate": run["hit_rate"],
                         "preemptions": run["preemptions"], "p50_ttft_ms": run["p50_ttft_ms"], "failed": run["failed"],
                         "client_cpu_fraction": run.get("client_cpu_fraction")})
    result = {**res.environment(), "benchmark": "data_parallel", "model": args.model, "dtype": args.dtype,
              "data_parallel_size": dp, "api_server_count": args.api_server_count,
              "client_processes": args.client_processes, "repeats": args.repeats,
              "workloads": {"nano": {"num_prompts": args.num_prompts, "len_range": [lo, hi],
                                     "temperature": args.temperature},
                            "tenants": {"num_tenants": args.num_tenants, "prefix_len": args.prefix_len,
                                        "unique_len": args.unique_len, "per_tenant": args.per_tenant,
                                        "output_len": args.output_len}},
              "servers": servers}
    table = res.markdown_table(rows, ["server", "workload", "output_tokens_per_s", "runs_tokens_per_s",
                                      "speedup_vs_one_core", "hit_rate",
                                      "preemptions", "p50_ttft_ms", "failed", "client_cpu_fraction"])
    res.save(result, args.output, table)


def add_parser(bench) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    p = bench.add_parser("data-parallel", help="one engine core against N behind one server (prefix and "
                                               "round-robin routing), on nano and a multi-tenant prefix workload")
    EngineArgs.add_cli_args(p)
    p.set_defaults(data_parallel_size=2, max_model_len=4096)
    p.add_argument("--api-server-count", type=int, default=2,
                   help="API processes of every server; with one, the tenants workload's burst keeps it busy for "
                        "the whole run (its CPU time is recorded), so the front end sets the pace, not the cores")
    p.add_argument("--workloads", nargs="+", choices=["nano", "tenants"], default=["nano", "tenants"])
    p.add_argument("--routings", nargs="+", choices=ROUTING_POLICIES, default=["prefix", "round-robin"],
                   help="the N-core servers to run, by routing")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each workload on each server; the table gives the median-throughput one")
    p.add_argument("--num-prompts", type=int, default=256, help="nano requests")
    p.add_argument("--nano-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=0.6)
    add_tenant_args(p)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds for a server to start")
    p.add_argument("--output", default=None, help="path stem for the .json and .md results")
    p.set_defaults(func=cmd_data_parallel)
