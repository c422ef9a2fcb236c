"""AsyncLLMEngine: the engine loop behind the server, in its own thread.

The LLMEngine is single-threaded: only the engine thread ever touches it. The event loop talks to
it through a command queue (add / abort), drained at the top of every loop iteration, and receives
outputs through per-request asyncio queues, fed with one `loop.call_soon_threadsafe` per step. So
the event loop never waits for a model step, and HTTP work never sits between two engine steps
(other than through the GIL: torch releases it during the forward pass, and SWITCH_INTERVAL below
bounds how long the engine waits to get it back; see the closing note of issue 3 for the
measurement that chose a thread over a process).

If `step()` raises, the loop is marked dead: every pending request gets the error, new requests
are refused, and `is_healthy` turns False (the server's /health answers 503).

This module imports neither fastapi nor prometheus_client: the stats sink is duck-typed.
"""

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace

from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The GIL hand-over interval for the whole process (Python's default is 5 ms). The engine thread
# releases the GIL inside every torch op and must win it back quickly from a busy event loop: with a
# saturated event loop on a 2-core CPU, 0.5 ms took the engine from 1.2-2.0 to 2.7-3.4 steps/s
# (a separate engine process: 3.2-4.1; idle: 6.4-7.0). See the issue 3 closing note.
SWITCH_INTERVAL = 0.0005


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an exception; the server must be restarted."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (the others carry on)."""


class EngineOverloadedError(RuntimeError):
    """The request was refused because the queue is full (`max_waiting_requests`); retry later."""


class _Stream:
    """One request's output queue, living on the event loop."""
    __slots__ = ("request_id", "queue", "loop", "finished", "arrival_time", "last_token_time",
                 "scheduled")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, arrival_time: float) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop
        self.finished = False
        self.arrival_time = arrival_time
        self.last_token_time: float | None = None
        self.scheduled = False


class AsyncLLMEngine:
    """Runs `engine.step()` in a background thread while there is work; asyncio-facing API."""

    def __init__(self, engine, stats=None, log_interval: float = 5.0,
                 switch_interval: float | None = SWITCH_INTERVAL, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        # Admission limit: a new request is refused (EngineOverloadedError -> HTTP 503) while the engine
        # already holds max_num_seqs + max_waiting_requests unfinished user requests, i.e. while N
        # requests already queue behind a full batch. None: unbounded. Checked on the engine thread,
        # so a burst between two steps cannot slip past it.
        self.max_waiting_requests = max_waiting_requests
        self.num_rejected = 0
        self.switch_interval = switch_interval
        self.stats = stats                    # optional sink: metrics.EngineMetrics (duck-typed)
        self.log_interval = log_interval
        self._cond = threading.Condition()
        self._commands: deque = deque()
        self._streams: dict[str, _Stream] = {}   # only the engine thread mutates after creation
        self._thread: threading.Thread | None = None
        self._stop = False
        self.dead_error: BaseException | None = None
        self._tokenizer = None
        self.num_steps = 0
        self.step_time = 0.0                  # seconds spent inside engine.step()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            if self.switch_interval is not None:
                sys.setswitchinterval(self.switch_interval)
            self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        running = False
        if self._thread is not None:
            self._thread.join(timeout)
            running = self._thread.is_alive()
            self._thread = None
        self.engine.shutdown(graceful=not running)

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._thread is not None and self._thread.is_alive()

    @property
    def tokenizer(self):
        """The event loop's own copy of the tokenizer (HF fast tokenizers must not be used from
        two threads at once; the engine thread keeps the original for detokenisation)."""
        if self._tokenizer is None and self.engine.tokenizer is not None:
            import copy
            try:
                self._tokenizer = copy.deepcopy(self.engine.tokenizer)
            except Exception:  # noqa: BLE001 - fall back to sharing it
                logger.warning("could not copy the tokenizer; sharing it with the engine thread")
                self._tokenizer = self.engine.tokenizer
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.model.max_model_len

    # ---- the asyncio side ---------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          prompt_text: str | None = None) -> _Stream:
        """Queue a request and wait until the engine accepted it. Raises ValueError (bad
        parameters, nothing ran) or EngineDeadError. Pass the result to `stream()`."""
        if self.dead_error is not None or self._thread is None:
            raise EngineDeadError(f"engine loop is not running: {self.dead_error!r}")
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, time.monotonic())
        added: asyncio.Future = loop.create_future()
        self._submit(("add", request_id, prompt, params, prompt_text, stream, added))
        try:
            await added
        except BaseException:
            self.abort_stream(stream)
            raise
        return stream

    async def stream(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Leaving early (client gone, task
        cancelled, generator closed) aborts the request in the engine at once."""
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.abort_stream(stream)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """add_request + stream in one."""
        stream = await self.add_request(request_id, prompt, params, prompt_text)
        async for output in self.stream(stream):
            yield output

    def abort_stream(self, stream: _Stream) -> None:
        if not stream.finished:
            stream.finished = True
            self._submit(("abort", stream.request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    async def call_in_engine(self, fn):
        """`fn(llm_engine)` run on the engine thread between two steps (so it sees a consistent
        engine; it must not mutate it), e.g. the dashboard's snapshot. When the loop is not running
        (not started, or dead), nothing else touches the engine and fn runs here."""
        if self._thread is None or not self._thread.is_alive() or self.dead_error is not None:
            return fn(self.engine)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._submit(("call", fn, future))
        return await future

    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        last_log = time.monotonic()
        try:
            last_snapshot = self._snapshot() if self.stats is not None else None
            while True:
                with self._cond:
                    while not self._commands and not self._stop and not engine.has_unfinished_requests():
                        if self.stats is not None:
                            self.stats.update_gauges(engine)
                        self._cond.wait()
                        # the log line's rates cover busy time only
                        last_log = time.monotonic()
                        last_snapshot = self._snapshot() if self.stats is not None else None
                    if self._stop:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._handle(command)
                if engine.has_unfinished_requests():
                    start = time.monotonic()
                    outputs = engine.step()
                    now = time.monotonic()
                    self.num_steps += 1
                    self.step_time += now - start
                    self._dispatch(outputs, start, now)
                if self.stats is not None:
                    self.stats.update_gauges(engine)
                    now = time.monotonic()
                    if now - last_log >= self.log_interval:
                        snapshot = self._snapshot()
                        if snapshot != last_snapshot or engine.has_unfinished_requests():
                            self.stats.log(engine, last_snapshot, snapshot, now - last_log)
                        last_log, last_snapshot = now, snapshot
        except BaseException as exc:   # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("engine loop died")
            self._die(exc)

    def _snapshot(self) -> tuple[int, int]:
        return (self.engine.stats.prompt_tokens, self.engine.stats.generation_tokens)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "call":
            _, fn, future = command
            try:
                result = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - the caller's failure, not the engine's
                _resolve(future, None, exc)
            else:
                _resolve(future, result)
            return
        if kind == "abort":
            request_id = command[1]
            stream = self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)
            if stream is not None and self.stats is not None:
                self.stats.record_aborted()
            return
        _, request_id, prompt, params, prompt_text, stream, added = command
        if stream.finished:          # the client left before the request reached the engine
            _resolve(added, None)
            return
        if self.max_waiting_requests is not None and self._is_full():
            self.num_rejected += 1
            _resolve(added, None, EngineOverloadedError(
                f"the server is overloaded: more than {self.max_waiting_requests} requests are waiting; "
                "retry later"))
            return
        try:
            self.engine.add_request(request_id, prompt, params, prompt_text=prompt_text,
                                    arrival_time=stream.arrival_time)
        except Exception as exc:     # noqa: BLE001 - ValueError and anything else fail this request alone
            _resolve(added, None, exc)
            return
        self._streams[request_id] = stream
        _resolve(added, None)

    def _is_full(self) -> bool:
        config = getattr(self.engine, "config", None)
        max_num_seqs = getattr(getattr(config, "scheduler", None), "max_num_seqs", 0) or 0
        unfinished = len(getattr(self.engine, "states", None) or ())
        return unfinished >= max_num_seqs + self.max_waiting_requests

    def _dispatch(self, outputs: list[RequestOutput], step_start: float, now: float) -> None:
        batch = []
        for stream in self._streams.values():
            if not stream.scheduled and self._is_scheduled(stream.request_id):
                stream.scheduled = True
                if self.stats is not None:
                    self.stats.record_queue_time(step_start - stream.arrival_time)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if self.stats is not None:
                new_tokens = sum(len(c.token_ids) for c in output.outputs)
                if stream.last_token_time is None:
                    self.stats.record_first_token(now - stream.arrival_time)
                elif new_tokens:
                    self.stats.record_inter_token(now - stream.last_token_time)
                stream.last_token_time = now
            if output.finished:
                del self._streams[output.request_id]
                if self.stats is not None:
                    self.stats.record_finished(output, now)
            batch.append((stream, output))
        failed = getattr(self.engine, "failed_requests", None)
        while failed:
            stream = self._streams.pop(failed.pop(), None)
            if stream is not None:
                batch.append((stream, RequestFailedError(
                    f"request {stream.request_id} failed in the engine (see the server log)")))
                if self.stats is not None:
                    self.stats.record_aborted()
        if batch:
            loop = batch[0][0].loop
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:     # the event loop has closed (server shutting down): no one is listening
                pass

    def _is_scheduled(self, request_id: str) -> bool:
        state = self.engine.states.get(request_id)
        if state is None:
            return True
        return any(c.num_computed_tokens > 0 or c.output_token_ids for c in state.children)

    def _die(self, exc: BaseException) -> None:
        self.dead_error = exc
        error = EngineDeadError(f"engine loop died: {exc!r}")
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        for command in commands:
            if command[0] == "add":
                _resolve(command[6], None, error)
            elif command[0] == "call":
                _resolve(command[2], None, error)
        streams = list(self._streams.values())
        self._streams.clear()
        by_loop: dict = {}
        for stream in streams:
            by_loop.setdefault(stream.loop, []).append((stream, error))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:     # loop already closed
                pass


def _deliver(batch) -> None:
    for stream, item in batch:
        if not stream.finished:
            stream.queue.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:
                stream.finished = True


def _resolve(future: asyncio.Future, result, exc: BaseException | None = None) -> None:
    def set_it() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    try:
        future.get_loop().call_soon_threadsafe(set_it)
    except RuntimeError:
        pass


def delta_params(params: SamplingParams) -> SamplingParams:
    """The params the server uses for streaming: per-step deltas."""
    return replace(params, output_kind="delta")
