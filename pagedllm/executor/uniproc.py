"""The model runner in the engine core's own process (one device)."""

from pagedllm.config import EngineConfig
from pagedllm.core_types import SchedulerOutput
from pagedllm.models.loader import ModelSource
from pagedllm.worker.model_runner import ModelRunner, PendingStep


class UniProcExecutor:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.model_runner = ModelRunner(config, source)

    @property
    def num_blocks(self) -> int:
        return self.model_runner.num_blocks

    @property
    def capacity(self) -> dict:
        """The KV accounting the dashboard shows."""
        return self.model_runner.capacity

    @property
    def worker_pids(self) -> list[int]:
        return []

    def execute_model(self, out: SchedulerOutput) -> PendingStep:
        return self.model_runner.execute_model(out)

    def model_info(self) -> dict:
        return self.model_runner.model_info()

    def shutdown(self, graceful: bool = True) -> None:
        pass
