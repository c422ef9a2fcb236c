"""A tensor-parallel rank other than 0: `python -m pagedllm.worker.tp_workers`, started by
executor/tensor_parallel.py with its arguments on stdin.

It builds a ModelRunner over its share of the model, then runs every step rank 0 broadcasts (the
scheduler's diff and the tokens read back since the last one) until rank 0 sends None. It ignores
SIGINT (Ctrl-C reaches the whole process group) and exits by itself when its parent, the engine
core's process, is gone.
"""

import faulthandler
import logging
import os
import pickle
import signal
import sys

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import parallel_state
from pagedllm.models.loader import ModelSource
from pagedllm.processes import exit_with_parent, ignore_ctrl_c
from pagedllm.worker.model_runner import ModelRunner


def share_cpu_cores(device_type: str, size: int) -> None:
    """On CPU the ranks compute side by side: give each an equal share of the cores."""
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def _worker_main(rank: int, config: EngineConfig, source: ModelSource, port: int, parent_pid: int) -> None:
    ignore_ctrl_c()
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1 <pid>` shows where a rank waits
    exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s")
    device_type = torch.device(config.device).type
    size = config.model.tensor_parallel_size
    share_cpu_cores(device_type, size)
    tp = parallel_state.init_group(rank, size, port, device_type)
    runner = ModelRunner(config, source, tp)
    while (step := tp.broadcast_object()) is not None:
        runner.run_worker_step(*step)
    parallel_state.destroy_group()


if __name__ == "__main__":
    _worker_main(*pickle.load(sys.stdin.buffer))
