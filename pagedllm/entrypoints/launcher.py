"""`pagedllm serve`: the processes and their lifecycle.

    --api-server-count 1 (the default with one engine core): this process is the API process
        (uvicorn on uvloop + httptools, input and output processing); it starts the engine core's process.
    --api-server-count N (the default is one per engine core, as in vLLM: with one API process for
        two cores, a burst of long shared-prefix prompts kept it busy for whole runs on two H200s,
        docs/benchmarks.md): this process starts the engine cores and N API processes
        (`python -m pagedllm.entrypoints.launcher`) that share the cores and the port: each listens on
        its own SO_REUSEPORT socket, so the kernel spreads new connections over them (one shared
        socket let an idle process take a whole burst); /metrics adds them up (prometheus_client's
        multiprocess mode).

Faults and shutdown: SIGTERM (or Ctrl-C) stops accepting connections, lets requests in flight
finish for --shutdown-timeout seconds, then stops the engine core, and the exit code is 0. If the
core dies, requests in flight end with an error, /health answers 503, and the server exits with 1
a moment later (a supervisor restarts it). If an API process dies, the core notices its parent is
gone (or the launcher stops everything) and exits: nothing is left behind.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import uvicorn

from pagedllm.config import EngineConfig
from pagedllm.engine.client import CoreAddresses, start_cores, stop_cores
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.models.loader import ModelSource

logger = logging.getLogger(__name__)

DEAD_EXIT_DELAY_S = 1.0     # /health answers 503 this long before a server with a dead core exits


class _Server(uvicorn.Server):
    """uvicorn, handling only `signals` (an API process under a launcher leaves SIGINT to it),
    without raising the signal again after the graceful shutdown (so that shutdown exits 0)."""

    def __init__(self, config: uvicorn.Config, signals: tuple[int, ...]) -> None:
        super().__init__(config)
        self.signals = signals

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class APIServerArgs:
    """Everything one API process needs (plain: it is pickled to child API processes)."""
    args: object                   # the parsed `pagedllm serve` flags
    config: EngineConfig
    source: ModelSource
    model_name: str
    addresses: list[CoreAddresses]    # one per engine core (data parallelism)
    num_api_servers: int


def served_model_name(args, config: EngineConfig) -> str:
    """--served-model-name, else the model as named; the bundled GGUF as its file name, without
    the extension."""
    from pathlib import Path
    if args.served_model_name or args.model:
        return args.served_model_name or args.model
    name = Path(config.model.model).name
    return name[:-5] if name.endswith(".gguf") else name


def api_server_count(requested: int | None, config: EngineConfig) -> int:
    """The API processes to start: as requested, else one per engine core."""
    count = config.data_parallel_size if requested is None else requested
    if count < 1:
        raise ValueError(f"api_server_count must be >= 1, got {count}")
    return count


def run_server(args) -> None:
    """Serve until SIGTERM/SIGINT (exit 0 after the graceful shutdown) or until the engine core
    dies (exit 1)."""
    config, source = EngineArgs.from_cli_args(args).create_config()
    name = served_model_name(args, config)
    count = api_server_count(args.api_server_count, config)
    if count == 1:
        cores = start_cores(config, source, 1, args.data_parallel_backend)
        code = serve_api(APIServerArgs(args, config, source, name, [c.addresses(0) for c in cores], 1), cores)
    else:
        code = _run_api_servers(args, config, source, name, count)
    if code:
        sys.exit(code)


def serve_api(a: APIServerArgs, cores: list | None = None, signals=(signal.SIGINT, signal.SIGTERM)) -> int:
    """One API process: build the front end and the app, run uvicorn; returns the exit code (1 if
    an engine core was lost). With `cores` (this process started them), they are stopped afterwards."""
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.metrics import EngineMetrics
    from pagedllm.entrypoints.app import build_app
    from pagedllm.entrypoints.limits import ServerLimits
    from pagedllm.models.loader import load_tokenizer
    from pagedllm.processes import freeze_gc_heap
    args = a.args
    client_index = a.addresses[0].client_index
    try:
        metrics = EngineMetrics(a.model_name, a.config.model.max_model_len, count_core_totals=client_index == 0)
        engine = AsyncLLM(a.config, load_tokenizer(a.source), a.addresses, metrics, args.stream_interval,
                          args.max_waiting_requests, a.num_api_servers, args.routing)
        limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_n=args.max_n)
        app = build_app(engine, a.model_name, args.api_key, args.max_logprobs, metrics, limits,
                        on_shutdown=engine.shutdown, auto_tools=args.enable_auto_tool_choice)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                loop="uvloop", http="httptools", timeout_keep_alive=5,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        sockets = None
        if a.num_api_servers > 1:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            sockets = [socket.create_server((args.host, args.port), family=family, reuse_port=True)]
        server = _Server(config, signals)
        engine.on_dead = lambda: asyncio.get_running_loop().call_later(
            DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)
        if client_index == 0:
            logger.info("serving %s on http://%s:%d/v1 (%d API process%s, %d engine core%s)", a.model_name,
                        args.host, args.port, a.num_api_servers, "es" if a.num_api_servers > 1 else "",
                        len(a.addresses), "s" if len(a.addresses) > 1 else "")
        freeze_gc_heap()   # torch, transformers, the tokenizer: loaded, never garbage
        server.run(sockets=sockets)
    finally:
        if cores is not None:
            stop_cores(cores)
    if isinstance(engine.startup_error, ValueError):
        raise engine.startup_error     # a configuration the core refused: `error: ...`, exit 2
    lost = any(error is not None for error in engine.core_errors())
    return 1 if lost or not server.started else 0


def _run_api_servers(args, config: EngineConfig, source: ModelSource, name: str, count: int) -> int:
    """The launcher of N API processes sharing one port and one engine core."""
    metrics_dir = tempfile.mkdtemp(prefix="pagedllm-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    cores = start_cores(config, source, count, args.data_parallel_backend)
    for core in cores:
        os.set_inheritable(core.death_fd, True)
    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})   # picklable
    children = []
    for i in range(count):
        child = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.launcher"], stdin=subprocess.PIPE,
                                 pass_fds=tuple(core.death_fd for core in cores), env=env)
        addresses = [core.addresses(i) for core in cores]
        child.stdin.write(pickle.dumps(APIServerArgs(options, config, source, name, addresses, count)))
        child.stdin.close()
        children.append(child)
    try:
        return _supervise(children, cores)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        stop_cores(cores)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(children: list[subprocess.Popen], cores: list) -> int:
    """Forward SIGTERM/SIGINT to the API processes as SIGTERM (they drain), and stop everything
    if one of them exits on its own."""
    stopping = []

    def forward(signum, frame) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [child.poll() for child in children]
            if all(code is not None for code in codes):
                return 0 if stopping and not any(codes) and all(core.is_running() for core in cores) else 1
            if not stopping and any(code is not None for code in codes):
                logger.error("an API process exited (codes %s): stopping the server", codes)
                forward(signal.SIGTERM, None)
                stopping.append("exit")
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _api_server_main(a: APIServerArgs) -> int:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s [api {a.addresses[0].client_index}] %(name)s: %(message)s")
    from pagedllm.processes import exit_with_parent, ignore_ctrl_c
    ignore_ctrl_c()          # the launcher forwards Ctrl-C as SIGTERM
    exit_with_parent(os.getppid())
    return serve_api(a, signals=(signal.SIGTERM,))


if __name__ == "__main__":
    sys.exit(_api_server_main(pickle.load(sys.stdin.buffer)))
