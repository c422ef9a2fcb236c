"""Stand-ins for the model below the engine core: an executor that answers at once."""

import random
import time
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.core_types import ModelRunnerOutput
from pagedllm.engine.engine_args import EngineArgs

CONFIG = str(Path(__file__).parent.parent / "pagedllm" / "data" / "qwen3-0.6b-config.json")


def dummy_config(max_num_batched_tokens: int = 256, max_num_seqs: int = 8) -> EngineConfig:
    """Qwen3-0.6B's config (no weights are loaded: the executors here need none)."""
    return EngineArgs(model=CONFIG, load_format="dummy", max_model_len=1024, device="cpu",
                      max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs).create_config()[0]


class _Done:
    needs_bitmask = False

    def __init__(self, out):
        self.out = out

    def result(self):
        return self.out


class InstantExecutor:
    """Samples a random token for every request that reaches its last token: which ones do is
    worked out from the scheduler's diffs, as the worker does."""

    def __init__(self, num_blocks: int, step_time: float = 0.0) -> None:
        self.num_blocks = num_blocks
        self.step_time = step_time
        self.capacity = {}
        self.worker_pids = []
        self.rng = random.Random(0)
        self.lengths: dict[str, int] = {}   # request id -> tokens (prompt + sampled)

    def execute_model(self, out):
        time.sleep(self.step_time)
        for request_id in out.finished_request_ids:
            self.lengths.pop(request_id, None)
        for new in out.new_requests:
            self.lengths[new.request_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
        sampled = []
        for request_id, n, start in zip(out.request_ids, out.num_scheduled_tokens, out.num_computed_tokens):
            if start + n == self.lengths[request_id]:
                sampled.append(request_id)
                self.lengths[request_id] += 1
        return _Done(ModelRunnerOutput(request_ids=sampled,
                                       sampled_token_ids=[self.rng.randrange(1000) for _ in sampled]))

    def shutdown(self, graceful=True):
        pass


class FailingExecutor(InstantExecutor):
    """Fails in the step where a request named "boom" runs, as a model or sampler error would."""

    def execute_model(self, out):
        if "boom" in out.request_ids:
            raise RuntimeError("injected model failure")
        return super().execute_model(out)
