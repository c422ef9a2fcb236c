"""What generate() returns, shaped like vLLM's RequestOutput so user code ports unchanged."""

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the sampled/prompt token plus the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)

    def add(self, later: "RequestOutput") -> None:
        """Merge a later delta output of the same request into this one (what a streaming reader
        that fell behind gets: one output with everything it has not read)."""
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        self.prompt_logprobs = later.prompt_logprobs
        self.metrics = later.metrics
        mine = {c.index: c for c in self.outputs}
        for c in later.outputs:
            earlier = mine.get(c.index)
            if earlier is None:
                self.outputs.append(c)
                continue
            earlier.text += c.text
            earlier.token_ids = earlier.token_ids + c.token_ids
            if c.logprobs is not None:
                earlier.logprobs = (earlier.logprobs or []) + c.logprobs
            earlier.cumulative_logprob = c.cumulative_logprob
            earlier.finish_reason, earlier.stop_reason = c.finish_reason, c.stop_reason
