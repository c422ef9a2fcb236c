"""What one batch of engine core outputs did, in plain numbers, for the metrics sink (engine/metrics.py
turns them into Prometheus observations). The output processor fills one per batch."""

from dataclasses import dataclass, field


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reasons: list[str]          # one per sequence
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(slots=True)
class IterationStats:
    num_generation_tokens: int = 0
    num_prompt_tokens: int = 0         # whole prompts of requests that got their first token
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
