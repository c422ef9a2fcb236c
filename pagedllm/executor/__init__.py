"""The executor seam: what the engine core sees of the workers. It calls execute_model(scheduler
output) -> a pending step whose result() is a ModelRunnerOutput, reads num_blocks (the KV pool's
size), and shuts it down. One process (uniproc.py) or tensor-parallel worker processes
(tensor_parallel.py)."""

from pagedllm.config import EngineConfig
from pagedllm.models.loader import ModelSource


def make_executor(config: EngineConfig, source: ModelSource):
    if config.model.tensor_parallel_size > 1:
        from pagedllm.executor.tensor_parallel import TensorParallelExecutor
        return TensorParallelExecutor(config, source)
    from pagedllm.executor.uniproc import UniProcExecutor
    return UniProcExecutor(config, source)
