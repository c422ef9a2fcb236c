"""The processes of tensor parallelism: rank 0 is the engine's own, ranks 1..N-1 are started here.

Each worker process builds a ModelRunner over its share of the model, then runs every step rank 0
broadcasts until rank 0 sends None. Nothing is left behind:
- a worker ignores SIGINT (Ctrl-C reaches the whole process group; rank 0 decides what to do) and
  exits by itself when rank 0's process is gone;
- rank 0 watches its workers: if one dies, it kills the others and ends its own process with exit
  code 1, since a step can no longer complete (with NCCL it would wait forever);
- at interpreter exit any worker still running is terminated.
"""

import atexit
import contextlib
import faulthandler
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import parallel_state
from pagedllm.models.loader import ModelSource
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def start_model_runner(config: EngineConfig, source: ModelSource) -> ModelRunner:
    """Rank 0's model runner; with tensor_parallel_size N > 1, ranks 1..N-1 start first."""
    size = config.model.tensor_parallel_size
    if size == 1:
        return ModelRunner(config, source)
    device_type = torch.device(config.device).type
    workers = WorkerProcesses(config, source)
    _share_cpu_cores(device_type, size)
    try:
        tp = parallel_state.init_group(0, size, workers.port, device_type)
        runner = ModelRunner(config, source, tp)
    except BaseException:
        workers.kill()
        raise
    runner.workers = workers
    workers.watch()
    return runner


def stop_model_runner(runner: ModelRunner, graceful: bool = True) -> None:
    """Stop the other ranks (told to, if they are between steps; else killed) and leave the
    process group."""
    workers = runner.workers
    if workers is None:
        return
    workers.stopping = True
    if graceful:
        runner.shutdown()
        left = parallel_state.destroy_group()   # together with the other ranks, which leave now too
        workers.join(timeout=30.0)
        workers.kill()
    else:
        workers.kill()
        left = parallel_state.destroy_group(timeout=2.0)
    if not left:
        logger.warning("the tensor-parallel process group did not shut down cleanly")
    torch.set_num_threads(workers.threads_before)
    runner.workers = None


class WorkerProcesses:
    """Ranks 1..N-1, each `python -m pagedllm.worker.tp_workers` reading its arguments from stdin
    (a fresh interpreter: the user's main module is never re-imported, unlike multiprocessing's
    spawn)."""

    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        size = config.model.tensor_parallel_size
        self.port = parallel_state.free_port()
        self.stopping = False
        self.threads_before = torch.get_num_threads()
        env = {**os.environ, **parallel_state.NO_MULTICAST_ENV}
        self.processes: list[subprocess.Popen] = []
        for rank in range(1, size):
            p = subprocess.Popen([sys.executable, "-m", "pagedllm.worker.tp_workers"], stdin=subprocess.PIPE, env=env)
            self.processes.append(p)
            p.stdin.write(pickle.dumps((rank, config, source, self.port, os.getpid())))
            p.stdin.close()
        atexit.register(self.kill)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="pagedllm-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping:
            dead = next((p for p in self.processes if p.poll() is not None), None)
            if dead is None:
                time.sleep(0.2)
                continue
            if self.stopping:
                return
            rank = self.processes.index(dead) + 1
            logger.error("tensor-parallel rank %d exited unexpectedly (exit code %s): stopping every rank",
                         rank, dead.returncode)
            self.kill()
            logging.shutdown()
            os._exit(1)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """Terminate what is still running: SIGTERM, then SIGKILL after 5 s."""
        self.stopping = True
        alive = [p for p in self.processes if p.poll() is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + 5.0
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _share_cpu_cores(device_type: str, size: int) -> None:
    """On CPU the ranks compute side by side: give each an equal share of the cores."""
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(rank: int, config: EngineConfig, source: ModelSource, port: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1 <pid>` shows where a rank waits
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s")
    device_type = torch.device(config.device).type
    size = config.model.tensor_parallel_size
    _share_cpu_cores(device_type, size)
    tp = parallel_state.init_group(rank, size, port, device_type)
    runner = ModelRunner(config, source, tp)
    while (batch := tp.broadcast_object()) is not None:
        runner.run_worker_step(batch)
    parallel_state.destroy_group()


if __name__ == "__main__":
    _worker_main(*pickle.load(sys.stdin.buffer))
