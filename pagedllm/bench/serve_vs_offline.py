"""`pagedllm bench serve-vs-offline`: what users run (the server) against the offline engine, in one
command on one device.

1. offline: `bench throughput --workload nano` (LLM.generate) and `bench latency` (one request: 512
   prompt tokens, 256 out), each in a process of its own, with the same engine flags;
2. for each --api-server-counts N: `pagedllm serve` with the same engine flags and N API processes,
   then the same nano requests through /v1/completions all at once, streamed and not (the lean
   aiohttp client in --client-processes processes, its CPU time recorded), streamed with the
   official AsyncOpenAI client, and the single request streamed; the prefix cache is reset before
   each run (POST /reset_prefix_cache), so no run reuses another's prompts;
3. the served/offline ratios, TTFT p50/p99, and single-stream TPOT against offline's.
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pagedllm.bench import results as res
from pagedllm.bench.serve import ClientConfig, add_client_args, benchmark, served_model
from pagedllm.bench.workloads import BenchRequest, nano_requests


def _offline(args) -> tuple[dict, dict]:
    """`bench throughput --workload nano` and `bench latency` with the same engine flags, each in its
    own process (so the device's memory is all the server's afterwards); their results."""
    from pagedllm.engine.engine_args import EngineArgs
    flags = EngineArgs.from_cli_args(args).to_cli_args()
    stem = Path(args.output or tempfile.mkdtemp(prefix="pagedllm-svo-"))
    lo, hi = args.nano_len_range
    _run_bench(["throughput", *flags, "--workload", "nano", "--num-prompts", str(args.num_prompts),
                "--nano-len-range", str(lo), str(hi), "--temperature", str(args.temperature),
                "--output", f"{stem}-offline"])
    _run_bench(["latency", *flags, "--input-len", str(args.latency_input_len), "--output-len",
                str(args.latency_output_len), "--repeats", "3", "--output", f"{stem}-latency"])
    return (json.loads(Path(f"{stem}-offline.json").read_text()),
            json.loads(Path(f"{stem}-latency.json").read_text()))


def _run_bench(argv: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", *argv], check=True)


def _nano(args, vocab: int) -> list[BenchRequest]:
    lo, hi = args.nano_len_range
    return nano_requests(vocab, num=args.num_prompts, min_len=lo, max_len=hi)


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=60).read()


def start_server(args, count: int, port: int, **engine_overrides) -> subprocess.Popen:
    """`pagedllm serve` with the engine flags of `args` (and `engine_overrides` on top) and `count`
    API processes; returns once /health answers."""
    from pagedllm.engine.engine_args import EngineArgs
    flags = EngineArgs.from_cli_args(args, **engine_overrides).to_cli_args()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *flags,
           "--port", str(port), "--api-server-count", str(count), "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + args.server_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start in {args.server_timeout} s")
        time.sleep(0.5)


def _served(args, count: int, requests: list[BenchRequest], vocab: int) -> dict:
    from pagedllm.distributed.parallel_state import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, count, port)
    runs = {}
    try:
        model = served_model(url + "/v1", None)

        def cfg(stream: bool, client: str = "aiohttp", temperature: float = args.temperature) -> ClientConfig:
            return ClientConfig(url + "/v1", model, None, stream, temperature, True, args.timeout, client)

        benchmark(cfg(True), requests[:2])   # warm-up
        for name, config, processes in (("stream", cfg(True), args.client_processes),
                                        ("no_stream", cfg(False), args.client_processes),
                                        ("stream_openai", cfg(True, "openai"), 1)):
            post(url + "/reset_prefix_cache")
            runs[name] = benchmark(config, requests, processes)
            print(f"served x{count} {name}: {runs[name]['output_throughput']:,.0f} tok/s, "
                  f"client CPU {runs[name].get('client_cpu_fraction', 0):.0%}", flush=True)
        single = [_one_stream(cfg(True, temperature=0.0), vocab, args, i) for i in range(3)]
        runs["single_stream"] = {"tpot_ms": sorted(s["mean_tpot_ms"] for s in single)[1],
                                 "ttft_ms": sorted(s["mean_ttft_ms"] for s in single)[1]}
    finally:
        runs["server_exit_code"] = stop_server(proc)
    return runs


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM (the server drains), then its exit code; killed (None) if it takes over 2 minutes."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


def _one_stream(cfg: ClientConfig, vocab: int, args, seed: int) -> dict:
    import random
    rng = random.Random(1000 + seed)
    prompt = [rng.randrange(vocab) for _ in range(args.latency_input_len)]
    return benchmark(cfg, [BenchRequest(prompt, args.latency_output_len)])


def cmd_serve_vs_offline(args: argparse.Namespace) -> None:
    if args.max_model_len is None:
        args.max_model_len = 4096
    if args.temperature is None:
        args.temperature = 0.6
    from pagedllm.engine.engine_args import EngineArgs
    vocab = EngineArgs.from_cli_args(args).create_config()[0].model.hf_config.vocab_size
    offline, latency = _offline(args)
    print(f"offline: {offline['output_tokens_per_s']:,.0f} tok/s, TPOT {latency['tpot_ms']:.3f} ms", flush=True)
    requests = _nano(args, vocab)
    result = {**res.environment(), "benchmark": "serve_vs_offline", "workload": "nano", "model": args.model,
              "dtype": args.dtype, "num_prompts": args.num_prompts, "len_range": list(args.nano_len_range),
              "temperature": args.temperature, "client_processes": args.client_processes,
              "offline": offline, "offline_latency": latency, "served": {}}
    rows = [{"run": "offline LLM.generate", "output_tokens_per_s": offline["output_tokens_per_s"], "ratio": 1.0}]
    for count in args.api_server_counts:
        runs = _served(args, count, requests, vocab)
        result["served"][str(count)] = runs
        for name in ("stream", "no_stream", "stream_openai"):
            run = runs[name]
            run["ratio_to_offline"] = run["output_throughput"] / offline["output_tokens_per_s"]
            rows.append({"run": f"served, {count} API process(es), {name}", "output_tokens_per_s": run["output_throughput"],
                         "ratio": run["ratio_to_offline"], "p50_ttft_ms": run["p50_ttft_ms"],
                         "p99_ttft_ms": run["p99_ttft_ms"], "failed": run["failed"],
                         "client_cpu_fraction": run.get("client_cpu_fraction")})
        single = runs["single_stream"]
        single["tpot_ratio_to_offline"] = single["tpot_ms"] / latency["tpot_ms"]
        rows.append({"run": f"one request streamed, {count} API process(es): TPOT {single['tpot_ms']:.3f} ms vs "
                            f"offline {latency['tpot_ms']:.3f} ms", "ratio": single["tpot_ratio_to_offline"]})
    table = res.markdown_table(rows, ["run", "output_tokens_per_s", "ratio", "p50_ttft_ms", "p99_ttft_ms", "failed",
                                      "client_cpu_fraction"])
    res.save(result, args.output, table)
    if args.output:
        from pagedllm.bench import plots
        plots.serve_vs_offline_plot(result, args.output)


def add_parser(bench) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    p = bench.add_parser("serve-vs-offline", help="the server (streaming and not) against LLM.generate, same requests")
    EngineArgs.add_cli_args(p)
    add_client_args(p)
    p.set_defaults(num_prompts=256, dataset="nano", client_processes=4)
    p.add_argument("--api-server-counts", type=int, nargs="+", default=[1])
    p.add_argument("--latency-input-len", type=int, default=512)
    p.add_argument("--latency-output-len", type=int, default=256)
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds for the server to start")
    p.add_argument("--output", default=None, help="path stem for the .json, .md and .png results")
    p.set_defaults(func=cmd_serve_vs_offline)

