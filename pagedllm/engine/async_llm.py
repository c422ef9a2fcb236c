"""AsyncLLM: the server's engine, as one API process sees it.

Input and output processing run here, on the event loop; the engine core runs in its own process
and is reached through an AsyncMPClient. add_request() validates, registers the request with the
output processor and sends its sequences to the core without waiting for an answer; one task
(the output handler) receives every step's outputs for this process's requests, turns them into
RequestOutputs in the requests' collectors, sends the aborts of sequences finished here (stop
strings), and feeds the metrics. Leaving a request's stream early aborts it in the core at once.

If the core dies, every request in flight ends with EngineDeadError, new requests are refused
with it, and `is_healthy` turns False (the server's /health answers 503, and the server exits).
With several cores (data parallelism: one address per core), a router picks each request's core;
one core's death fails only its own requests (`core_errors` names it) and the rest serve on.
"""

import asyncio
import logging
import math
from collections.abc import AsyncIterator

from pagedllm.config import EngineConfig
from pagedllm.engine.client import AsyncMPClient, CoreAddresses, EngineDeadError
from pagedllm.engine.dp_client import DPAsyncClient
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.engine.output_processor import OutputProcessor, RequestOutputCollector
from pagedllm.engine.router import Router
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 5.0


class EngineOverloadedError(RuntimeError):
    """The request was refused because the queue is full (`max_waiting_requests`); retry later."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, tokenizer, addresses: list[CoreAddresses], metrics=None,
                 stream_interval: int = 1, max_waiting_requests: int | None = None, num_api_servers: int = 1,
                 routing: str = "prefix") -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model.hf_config.vocab_size
        self.max_model_len = config.model.max_model_len
        self.input_processor = InputProcessor(config, tokenizer)
        self.output_processor = OutputProcessor(tokenizer, stream_interval)
        if len(addresses) == 1:
            self.client = AsyncMPClient(addresses[0], self._on_dead)
        else:
            router = Router(len(addresses), config.cache.block_size, routing, routers=num_api_servers,
                            capacity=config.scheduler.max_num_seqs)
            self.client = DPAsyncClient(addresses, router, self._on_dead)
        self.metrics = metrics
        self.log_stats = metrics is not None and self.client.client_index == 0
        # Admission limit: a new request is refused (EngineOverloadedError -> HTTP 503) while this
        # process already holds its share of max_num_seqs + max_waiting_requests unfinished requests.
        self.max_requests = None
        if max_waiting_requests is not None:
            total = config.scheduler.max_num_seqs + max_waiting_requests
            self.max_requests = math.ceil(total / num_api_servers)
        self.dead_error: BaseException | None = None
        self.startup_error: BaseException | None = None
        self.on_dead = None            # called (on the event loop) once the core is gone
        self._handler: asyncio.Task | None = None

    async def start(self) -> None:
        """Wait for the engine core to be ready, then start handling its outputs."""
        await self.client.wait_ready()
        if self.dead_error is not None:     # it could not start
            self.startup_error = self.dead_error
            raise self.dead_error
        self._handler = asyncio.create_task(self._handle_outputs(), name="pagedllm-output-handler")

    async def shutdown(self) -> None:
        """Abort what is still running, stop handling outputs and close the connection (whoever
        started the core stops it)."""
        for request_id in list(self.output_processor.requests):
            self.abort(request_id)
        if self._handler is not None:
            self._handler.cancel()
        self.client.close()

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._handler is not None and not self._handler.done()

    # ---- requests ---------------------------------------------------------------------------
    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.input_processor.tokenize(prompt, add_special_tokens)

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> RequestOutputCollector:
        """Queue a request; its outputs arrive in the returned collector (see stream()). Raises
        ValueError (bad parameters: nothing was sent), EngineOverloadedError or EngineDeadError."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine core is not running: {self.dead_error}")
        if self.max_requests is not None and self.output_processor.num_requests >= self.max_requests:
            raise EngineOverloadedError(f"the server is overloaded: more than {self.max_requests} requests are "
                                        "in flight; retry later")
        requests = self.input_processor.process(request_id, token_ids, params, client_index=self.client.client_index)
        collector = RequestOutputCollector(delta=params.output_kind == "delta")
        self.output_processor.add_request(request_id, prompt_text, token_ids, params, requests[0].arrival_time,
                                          collector)
        self.client.add_requests(requests)
        return collector

    async def stream(self, request_id: str, collector: RequestOutputCollector) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes. Leaving early (client gone, task cancelled,
        generator closed) aborts the request in the engine core at once."""
        finished = False
        try:
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, request_id: str, token_ids: list[int], params: SamplingParams,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """add_request + stream in one."""
        collector = self.add_request(request_id, token_ids, params, prompt_text)
        async for output in self.stream(request_id, collector):
            yield output

    def abort(self, request_id: str) -> None:
        running = self.output_processor.abort_request(request_id)
        if running:
            self.client.abort_requests(running)
            if self.metrics is not None:
                self.metrics.record_aborted()

    async def call_utility(self, method: str, *args):
        """A named call every engine core runs between two steps (e.g. "reset_prefix_cache"); the
        first core's result, or its error if every core failed."""
        results = await self.client.call_each(method, *args)
        for result in results:
            if not isinstance(result, BaseException):
                return result
        raise results[0]

    async def call_each(self, method: str, *args) -> list:
        """Every core's result of a named call (e.g. "snapshot"), or the exception it raised."""
        return await self.client.call_each(method, *args)

    def core_errors(self) -> list[BaseException | None]:
        """Per engine core: None while it runs, else why it stopped."""
        return self.client.core_errors()

    # ---- the output handler ------------------------------------------------------------------
    async def _handle_outputs(self) -> None:
        processor, client, metrics = self.output_processor, self.client, self.metrics
        try:
            while self.dead_error is None:
                outputs = await client.get_output()
                processed = processor.process_outputs(outputs)
                if processed.to_abort:
                    client.abort_requests(processed.to_abort)
                if metrics is not None:
                    metrics.record_iteration(processed.stats)
                    if outputs.scheduler_stats is not None:
                        metrics.record_scheduler(outputs.scheduler_stats, outputs.engine_index)
                        if self.log_stats:
                            metrics.maybe_log(outputs.scheduler_stats, LOG_INTERVAL_S, outputs.engine_index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing can reach the core's outputs any more
            logger.exception("the output handler failed")
            client.mark_dead(EngineDeadError(f"the output handler failed: {exc!r}"))

    def _on_dead(self, error: BaseException) -> None:
        logger.error("%s", error)
        self.dead_error = error
        self.output_processor.fail_all(EngineDeadError(str(error)))
        if self.on_dead is not None:
            self.on_dead()
