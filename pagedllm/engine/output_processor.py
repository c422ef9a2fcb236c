"""The front end's side of every step: the engine core's arrays of new tokens become RequestOutputs.

Here, not in the engine core, live everything that is per request and per text: incremental
detokenization, stop strings (a match finishes the sequence here and goes to the core as an abort),
logprob dicts with each token's text, the n sequences of one request gathered into one output,
and the timings behind the metrics. Offline, the outputs are returned; in the server each request
has a RequestOutputCollector, one slot that merges the deltas its reader has not taken yet (so a
slow reader gets fewer, larger chunks instead of a growing queue).
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from pagedllm.core_types import EngineCoreOutputs, LogprobEntry
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.input_processor import child_ids
from pagedllm.engine.stats import FinishedRequestStats, IterationStats
from pagedllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """One request failed in output processing (the others carry on)."""


class RequestOutputCollector:
    """One request's outputs on their way to an asyncio reader: put() never waits, and merges a
    delta into the one the reader has not taken yet; an exception replaces whatever waits."""
    __slots__ = ("output", "ready", "delta")

    def __init__(self, delta: bool) -> None:
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.delta = delta

    def put(self, item: RequestOutput | BaseException) -> None:
        waiting = self.output
        if self.delta and isinstance(item, RequestOutput) and isinstance(waiting, RequestOutput):
            waiting.add(item)
        elif not isinstance(waiting, BaseException):
            self.output = item
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        item, self.output = self.output, None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass(eq=False, slots=True)
class SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False


@dataclass(eq=False, slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    arrival_time: float
    prompt_logprobs: list | None
    collector: RequestOutputCollector | None = None
    num_unfinished: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)   # for requests without a collector
    to_abort: list[str] = field(default_factory=list)    # sequences finished here: tell the engine core
    failed: list[tuple[str, BaseException]] = field(default_factory=list)   # requests without a collector
    stats: IterationStats = field(default_factory=IterationStats)


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int = 1) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.requests: dict[str, RequestState] = {}
        self._sequences: dict[str, tuple[RequestState, SequenceState]] = {}   # engine core id -> its owner
        # skip_special_tokens -> token id -> the token's text decoded alone (logprobs, detokenizers)
        self._token_text: dict[bool, dict[int, str]] = {False: {}, True: {}}

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, collector: RequestOutputCollector | None = None) -> RequestState:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        incremental = self.tokenizer is not None and (params.stop or params.output_kind != "final")
        sequences = [SequenceState(i, self._detokenizer(prompt_token_ids, params) if incremental else None,
                                   [] if params.logprobs is not None else None) for i in range(params.n)]
        state = RequestState(request_id, prompt, prompt_token_ids, params, sequences, arrival_time,
                             [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None,
                             collector, num_unfinished=params.n)
        self.requests[request_id] = state
        for seq_id, seq in zip(child_ids(request_id, params.n), sequences):
            self._sequences[seq_id] = (state, seq)
        return state

    def _detokenizer(self, token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens, params.stop,
                                      params.include_stop_str_in_output,
                                      self._token_text[bool(params.skip_special_tokens)])

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns its engine core ids still running there."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        return self._forget(state)

    def _forget(self, state: RequestState) -> list[str]:
        running = []
        for seq_id, seq in zip(child_ids(state.request_id, state.params.n), state.sequences):
            if self._sequences.pop(seq_id, None) is not None and seq.finish_reason is None:
                running.append(seq_id)
        return running

    def fail_all(self, exc: BaseException) -> None:
        """The engine core is gone: every request ends with exc."""
        for state in list(self.requests.values()):
            if state.collector is not None:
                state.collector.put(exc)
        self.requests.clear()
        self._sequences.clear()

    # ---- one batch of outputs -------------------------------------------------------------------
    def process_outputs(self, outputs: EngineCoreOutputs) -> ProcessedOutputs:
        result = ProcessedOutputs()
        stats = result.stats
        now = time.monotonic()
        sequences = self._sequences
        if outputs.prompt_logprobs:
            self._add_prompt_logprobs(outputs.prompt_logprobs)
        for seq_id, reason in outputs.errors.items():   # sequences the core gave up on (or lost)
            owner = sequences.get(seq_id)
            if owner is not None:
                owner[1].finish_reason = "abort"    # gone from the core already: only its siblings need aborts
                self._fail(owner[0], RequestFailedError(f"request {owner[0].request_id} failed: {reason}"), result)
        touched: dict[str, RequestState] = {}
        finished, logprobs, first = outputs.finished, outputs.logprobs, outputs.num_cached_tokens
        for seq_id, token in zip(outputs.request_ids, outputs.new_token_ids):
            owner = sequences.get(seq_id)
            if owner is None:
                continue   # aborted, or finished here by a stop string: the core learns it soon
            state, seq = owner
            try:
                stop = self._add_token(seq, token, logprobs.get(seq_id) if seq.logprobs is not None else None)
            except Exception as exc:  # noqa: BLE001 - e.g. a failing detokenization: this request fails alone
                self._fail_in_processing(state, exc, result)
                touched.pop(state.request_id, None)
                continue
            stats.num_generation_tokens += 1
            if seq_id in first:
                state.num_cached_tokens = first[seq_id]
                stats.queue_times.append(outputs.queue_time.get(seq_id, 0.0))
            end = finished.get(seq_id)
            if end is not None:
                seq.finish_reason, seq.stop_reason = end
            elif stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                result.to_abort.append(seq_id)
            if seq.finish_reason is not None:
                state.num_unfinished -= 1
                del sequences[seq_id]
            touched[state.request_id] = state
        for state in touched.values():
            self._emit(state, now, result)
        return result

    def _add_token(self, seq: SequenceState, token: int, entry: LogprobEntry | None) -> str | None:
        """Append one token; returns the stop string it completed, if any."""
        seq.token_ids.append(token)
        if entry is not None:
            seq.logprobs.append(self._logprob_dict(token, entry))
            seq.cumulative_logprob += entry[0]
        detok = seq.detokenizer
        return detok.add_token(token) if detok is not None else None

    def _add_prompt_logprobs(self, entries: dict) -> None:
        for seq_id, (start, rows) in entries.items():
            owner = self._sequences.get(seq_id)
            if owner is None or owner[0].prompt_logprobs is None:
                continue
            state = owner[0]
            for offset, entry in enumerate(rows):
                position = start + offset + 1
                state.prompt_logprobs[position] = self._logprob_dict(state.prompt_token_ids[position], entry)

    def _emit(self, state: RequestState, now: float, result: ProcessedOutputs) -> None:
        stats = result.stats
        if state.first_token_time is None:
            state.first_token_time = now
            stats.time_to_first_tokens.append(now - state.arrival_time)
            stats.num_prompt_tokens += len(state.prompt_token_ids)
        else:
            stats.inter_token_latencies.append(now - state.last_token_time)
        state.last_token_time = now
        try:
            output = self._make_output(state, now)
        except Exception as exc:  # noqa: BLE001
            self._fail_in_processing(state, exc, result)
            return
        if output is not None:
            if state.collector is not None:
                state.collector.put(output)
            else:
                result.outputs.append(output)
        if state.num_unfinished == 0:
            del self.requests[state.request_id]
            stats.finished.append(FinishedRequestStats(
                [s.finish_reason for s in state.sequences], now - state.arrival_time, len(state.prompt_token_ids),
                sum(len(s.token_ids) for s in state.sequences)))

    def _fail(self, state: RequestState, error: BaseException, result: ProcessedOutputs) -> None:
        """The request ends with `error`; its sequences still running leave the core."""
        self.requests.pop(state.request_id, None)
        result.to_abort.extend(self._forget(state))
        if state.collector is not None:
            state.collector.put(error)
        else:
            result.failed.append((state.request_id, error))

    def _fail_in_processing(self, state: RequestState, exc: BaseException, result: ProcessedOutputs) -> None:
        logger.exception("request %s failed while processing its output; aborting it", state.request_id)
        self._fail(state, RequestFailedError(f"request {state.request_id} failed in output processing: {exc!r}"),
                   result)

    # ---- RequestOutput ------------------------------------------------------------------------
    def _make_output(self, state: RequestState, now: float) -> RequestOutput | None:
        finished = state.num_unfinished == 0
        kind = state.params.output_kind
        if kind == "final" and not finished:
            return None
        completions = []
        for seq in state.sequences:
            completion = self._completion(state, seq, kind)
            if completion is not None:
                completions.append(completion)
        if not completions and not finished:
            return None
        metrics = {}
        if finished:
            metrics = {"arrival_time": state.arrival_time, "first_token_time": state.first_token_time,
                       "finished_time": now, "num_prompt_tokens": len(state.prompt_token_ids),
                       "num_generation_tokens": sum(len(s.token_ids) for s in state.sequences)}
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, prompt_logprobs=state.prompt_logprobs,
                             outputs=completions, finished=finished, num_cached_tokens=state.num_cached_tokens,
                             metrics=metrics)

    def _completion(self, state: RequestState, seq: SequenceState, kind: str) -> CompletionOutput | None:
        done = seq.finish_reason is not None
        detok = seq.detokenizer
        logprobs = seq.logprobs
        if kind == "delta":
            if seq.sent_finish:
                return None
            num = len(seq.token_ids)
            safe = detok.stream_safe_length(done) if detok is not None else 0
            new_tokens = num - seq.sent_tokens
            if not done and (new_tokens <= 0 and safe <= seq.sent_text
                             or 0 < seq.sent_tokens and new_tokens < self.stream_interval):
                return None   # nothing new, or fewer tokens than --stream-interval after the first
            # slice only the new tokens: copying the whole output at every step is quadratic
            text = detok.text[seq.sent_text:safe] if detok is not None else ""
            tokens = seq.token_ids[seq.sent_tokens:num]
            logprobs = logprobs[seq.sent_tokens:num] if logprobs is not None else None
            seq.sent_text, seq.sent_tokens, seq.sent_finish = max(safe, seq.sent_text), num, done
        else:
            text = detok.text if detok is not None else (self._decode(seq, state.params) if done else "")
            tokens = list(seq.token_ids)
            logprobs = list(logprobs) if logprobs is not None else None
        return CompletionOutput(index=seq.index, text=text, token_ids=tokens,
                                cumulative_logprob=seq.cumulative_logprob if logprobs is not None else None,
                                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _decode(self, seq: SequenceState, params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(seq.token_ids, skip_special_tokens=params.skip_special_tokens)

    def _logprob_dict(self, token: int, entry: LogprobEntry) -> PositionLogprobs:
        logprob, rank, top_ids, top_values = entry
        out = {token: Logprob(logprob, rank, self._decode_token(token))}
        for r, (tid, value) in enumerate(zip(top_ids, top_values), start=1):
            if tid not in out:
                out[tid] = Logprob(value, r, self._decode_token(tid))
        return out

    def _decode_token(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        cache = self._token_text[False]
        text = cache.get(token)
        if text is None:
            text = cache[token] = self.tokenizer.decode([token])
        return text
