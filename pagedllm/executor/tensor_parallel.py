"""Tensor parallelism's processes: rank 0's model runner lives in the engine core's process, ranks
1..N-1 are `python -m pagedllm.worker.tp_workers` processes started here.

Nothing is left behind:
- a worker ignores SIGINT (Ctrl-C reaches the whole process group; the server decides what to do)
  and exits by itself when the engine core's process is gone;
- the executor watches its workers: if one dies, it kills the others and ends the engine core's
  process with exit code 1, since a step can no longer complete (with NCCL it would wait forever);
- at interpreter exit any worker still running is terminated.
"""

import atexit
import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import parallel_state
from pagedllm.executor.uniproc import UniProcExecutor
from pagedllm.models.loader import ModelSource
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.tp_workers import share_cpu_cores

logger = logging.getLogger(__name__)


class TensorParallelExecutor(UniProcExecutor):
    """Rank 0's model runner here (as one device's executor has it), the other ranks in processes."""

    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        size = config.model.tensor_parallel_size
        self.workers = WorkerProcesses(config, source)
        share_cpu_cores(torch.device(config.device).type, size)
        try:
            tp = parallel_state.init_group(0, size, self.workers.port, torch.device(config.device).type)
            self.model_runner = ModelRunner(config, source, tp)
        except BaseException:
            self.workers.kill()
            parallel_state.destroy_group(timeout=2.0)
            torch.set_num_threads(self.workers.threads_before)
            raise
        self.workers.watch()

    @property
    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the other ranks (told to, if they are between steps; else killed) and leave the
        process group (idempotent). `graceful=False` when a step may have stopped halfway."""
        workers = self.workers
        if workers.stopping:
            return
        workers.stopping = True
        if graceful:
            self.model_runner.shutdown()
            left = parallel_state.destroy_group()   # together with the other ranks, which leave now too
            workers.join(timeout=30.0)
            workers.kill()
        else:
            workers.kill()
            left = parallel_state.destroy_group(timeout=2.0)
        if not left:
            logger.warning("the tensor-parallel process group did not shut down cleanly")
        torch.set_num_threads(workers.threads_before)


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
