"""LLMEngine: add_request / step / abort, and turning sampled tokens into RequestOutputs.

A user request with n > 1 becomes n sequences (Requests) that share the prompt; with prefix
caching on, they share the prompt's full blocks too. Each step: schedule, run the model, advance
the scheduler, detokenise, check stop strings (finishing and freeing at once), emit outputs.
"""

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.config import EngineConfig
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import PendingStep

logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    """Output-side state of one user request (all of its n sequences)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    logprobs: list[list[dict[int, Logprob]] | None]
    cumulative_logprob: list[float]
    prompt_logprobs: list | None
    sent_text: list[int]
    sent_tokens: list[int]
    arrival_time: float
    first_token_time: float | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        for child in self.children:   # a plain loop: this runs for every streamed request, every step
            if not child.is_finished:
                return False
        return True


@dataclass
class EngineStats:
    """Counters since start (the server turns them into Prometheus metrics)."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_runner, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_runner = model_runner
        self.kv_cache = KVCacheManager(model_runner.num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.states: dict[str, RequestState] = {}
        self._owners: dict[str, tuple[RequestState, int]] = {}   # child id -> (state, child index)
        self.stats = EngineStats()
        self.failed_requests: set[str] = set()   # ids aborted by an output-processing error (drained by callers)
        self._in_flight: tuple[SchedulerOutput, "PendingStep"] | None = None
        self._ids = itertools.count()
        # skip_special_tokens -> token id -> the token's text decoded alone (logprobs, detokenizers)
        self._token_text: dict[bool, dict[int, str]] = {False: {}, True: {}}
        self.vocab_size = config.model.hf_config.vocab_size
        min_pool = -(-config.model.max_model_len // config.cache.block_size)
        if model_runner.num_blocks < min_pool:
            raise ValueError(f"the KV cache ({model_runner.num_blocks} blocks) cannot hold one request of "
                             f"max_model_len {config.model.max_model_len}: lower max_model_len or give "
                             "the cache more memory")

    @classmethod
    def from_engine_args(cls, args) -> "LLMEngine":
        from pagedllm.models.loader import load_tokenizer
        from pagedllm.worker.tp_workers import start_model_runner, stop_model_runner
        config, source = args.create_config()
        tokenizer = load_tokenizer(source)
        runner = start_model_runner(config, source)
        try:
            return cls(config, runner, tokenizer)
        except BaseException:
            stop_model_runner(runner)
            raise

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent). `graceful=False` when a step
        may still be running in another thread: the ranks are then killed, not told."""
        from pagedllm.worker.tp_workers import stop_model_runner
        stop_model_runner(self.model_runner, graceful)

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt must be token ids: this model was loaded without a tokenizer")
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None, arrival_time: float | None = None) -> None:
        """Validate and queue a request. `prompt` is text or token ids. Raises ValueError (naming
        the parameter) before anything is scheduled."""
        if request_id in self.states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenize(prompt)
        else:
            token_ids = list(prompt)
        self._validate(token_ids, params)
        max_len = self.config.model.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(token_ids)
        now = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = _with_seed(params, params.seed + index)
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            children.append(Request(child_id, token_ids, child_params, max_tokens, arrival_time=now))
        incremental = params.stop or params.output_kind != "final"
        state = RequestState(
            request_id=request_id, prompt=prompt_text, prompt_token_ids=token_ids, params=params,
            children=children,
            detokenizers=[self._detokenizer(token_ids, params) if incremental and self.tokenizer else None
                          for _ in children],
            logprobs=[[] if params.logprobs is not None else None for _ in children],
            cumulative_logprob=[0.0 for _ in children],
            prompt_logprobs=[None] * len(token_ids) if params.prompt_logprobs is not None else None,
            sent_text=[0] * len(children), sent_tokens=[0] * len(children), arrival_time=now)
        self.states[request_id] = state
        for index, child in enumerate(children):
            self.scheduler.add_request(child)
            self._owners[child.request_id] = (state, index)

    def _detokenizer(self, token_ids, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens, params.stop,
                                      params.include_stop_str_in_output,
                                      self._token_text[bool(params.skip_special_tokens)])

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.model.max_model_len
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, which leaves no room to generate within "
                             f"max_model_len {max_len}")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > max_len:
            raise ValueError(f"max_tokens {params.max_tokens} plus the prompt's {len(token_ids)} tokens "
                             f"exceeds max_model_len {max_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        if params.logprobs is not None and params.logprobs > params.max_logprobs:
            raise ValueError(f"logprobs must be <= {params.max_logprobs}")
        for token in (params.logit_bias or {}):
            if token >= self.vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary ({self.vocab_size})")

    def abort_request(self, request_id: str) -> None:
        """Abort a request at any time; its blocks are freed at once."""
        state = self.states.pop(request_id, None)
        if state is None:
            return
        self._forget_children(state)
        for child in state.children:
            if not child.is_finished:
                self.scheduler.finish_request(child.request_id, RequestStatus.FINISHED_ABORTED)
        self.model_runner.release(c.request_id for c in state.children)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and issue step N, then finish step N-1, which ran on the device while step N
        was being prepared, and return its outputs. The host's work hides behind the device's."""
        sched_out = self.scheduler.schedule()
        launched = None
        if not sched_out.is_empty:
            self.stats.prompt_tokens += sched_out.num_prompt_tokens
            launched = (sched_out, self.model_runner.launch(sched_out))
            self.scheduler.on_launched(sched_out)
        outputs = self._complete(*self._in_flight) if self._in_flight is not None else []
        self._in_flight = launched
        return outputs

    def _complete(self, sched_out: SchedulerOutput, pending: "PendingStep") -> list[RequestOutput]:
        model_out = pending.result()
        advanced = self.scheduler.update_from_output(sched_out, model_out.sampled)
        now = time.monotonic()
        touched: dict[str, RequestState | None] = {}
        for request_id, (start, entries) in model_out.prompt_logprobs.items():
            state = self._state_of(request_id)
            if state is not None and state.prompt_logprobs is not None:
                for offset, entry in enumerate(entries):
                    position = start + offset + 1
                    state.prompt_logprobs[position] = self._logprob_dict(
                        state.prompt_token_ids[position], entry)
        logprobs = model_out.logprobs
        num_tokens = 0
        for request, token in advanced:
            owner = self._owners.get(request.request_id)
            if owner is None:
                continue
            state, index = owner
            num_tokens += 1
            if state.first_token_time is None:
                state.first_token_time = now
            try:
                self._process_token(state, index, request, token, logprobs.get(request.request_id))
            except Exception:  # noqa: BLE001 - e.g. a failing detokenisation: this request fails alone
                self._fail(state)
                touched.pop(state.request_id, None)
                continue
            if request.is_finished or state.params.output_kind != "final":
                touched[state.request_id] = state
            else:
                # a "final" request has nothing to emit until a child finishes (the common case);
                # None keeps its place in the output order should a sibling finish later this step
                touched.setdefault(state.request_id, None)
        self.stats.generation_tokens += num_tokens
        outputs = []
        for state in touched.values():
            if state is None or state.request_id not in self.states:
                continue
            try:
                output = self._make_output(state, now)
            except Exception:  # noqa: BLE001
                self._fail(state)
                continue
            if output is not None:
                outputs.append(output)
        return outputs

    def _fail(self, state: RequestState) -> None:
        """Abort one request whose output processing raised; the caller sees it vanish from
        `states` without a finished output (the async engine reports an error for it)."""
        logger.exception("request %s failed while processing its output; aborting it", state.request_id)
        self.failed_requests.add(state.request_id)
        self.abort_request(state.request_id)

    def _state_of(self, child_id: str) -> RequestState | None:
        owner = self._owners.get(child_id)
        return owner[0] if owner is not None else None

    def _forget_children(self, state: RequestState) -> None:
        for child in state.children:
            self._owners.pop(child.request_id, None)

    def _process_token(self, state: RequestState, index: int, request: Request, token: int,
                       logprob_entry) -> None:
        if logprob_entry is not None and state.logprobs[index] is not None:
            state.logprobs[index].append(self._logprob_dict(token, logprob_entry))
            state.cumulative_logprob[index] += logprob_entry[0]
        detok = state.detokenizers[index]
        if detok is None:
            return
        matched = detok.add_token(token)
        if matched is not None and not request.is_finished:
            request.stop_reason = matched
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    def _logprob_dict(self, token: int, entry) -> dict[int, Logprob]:
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

    def _make_output(self, state: RequestState, now: float) -> RequestOutput | None:
        finished = state.finished
        kind = state.params.output_kind
        if kind == "final" and not finished:
            return None
        completions = []
        for i, child in enumerate(state.children):
            completion = self._completion(state, i, child, kind, finished)
            if completion is not None:
                completions.append(completion)
        if finished:
            self._finish(state, now)
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, prompt_logprobs=state.prompt_logprobs,
                             outputs=completions, finished=finished,
                             num_cached_tokens=max(0, state.children[0].num_cached_tokens),
                             metrics=state.metrics if finished else {})

    def _completion(self, state: RequestState, i: int, child: Request, kind: str, finished: bool):
        detok = state.detokenizers[i]
        if detok is not None:
            text = detok.text
        elif child.is_finished and self.tokenizer is not None:
            text = self.tokenizer.decode(child.known_output_token_ids,
                                         skip_special_tokens=state.params.skip_special_tokens)
        else:
            text = ""
        num_known = child.num_known_output_tokens
        logprobs = state.logprobs[i]
        if kind == "delta":
            safe = detok.stream_safe_length(child.is_finished) if detok is not None else len(text)
            text_start, token_start = state.sent_text[i], state.sent_tokens[i]
            if safe <= text_start and num_known <= token_start and not child.is_finished:
                return None
            # slice only the new tokens: copying the whole output at every step is quadratic
            text, tokens = text[text_start:safe], child.output_token_ids[token_start:num_known]
            logprobs = logprobs[token_start:] if logprobs is not None else None
            state.sent_text[i], state.sent_tokens[i] = max(safe, text_start), num_known
        else:
            tokens = child.output_token_ids[:num_known]
            logprobs = list(logprobs) if logprobs is not None else None
        return CompletionOutput(index=i, text=text, token_ids=tokens,
                                cumulative_logprob=state.cumulative_logprob[i] if logprobs is not None else None,
                                logprobs=logprobs, finish_reason=child.finish_reason,
                                stop_reason=child.stop_reason)

    def _finish(self, state: RequestState, now: float) -> None:
        del self.states[state.request_id]
        self._forget_children(state)
        self.model_runner.release(c.request_id for c in state.children)
        for child in state.children:
            reason = child.finish_reason or "abort"
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        first = state.first_token_time or now
        state.metrics = {
            "arrival_time": state.arrival_time, "first_token_time": first, "finished_time": now,
            "num_prompt_tokens": len(state.prompt_token_ids),
            "num_generation_tokens": sum(c.num_output_tokens for c in state.children),
            "num_preemptions": sum(c.num_preemptions for c in state.children),
        }


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace
    return replace(params, seed=seed)
