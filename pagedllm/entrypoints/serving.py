"""What the completion and chat endpoints share: the server's context, a request's prompts into the
engine, their outputs merged as they come, a non-streaming wait that notices a client leaving,
and the fast JSON / server-sent-event encoding of responses (msgspec)."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.client import EngineDeadError
from pagedllm.engine.output_processor import RequestFailedError
from pagedllm.entrypoints.errors import APIError, bad_request
from pagedllm.entrypoints.limits import ServerLimits
from pagedllm.entrypoints.protocol import error_body
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_json = msgspec.json.Encoder()


@dataclass
class ServerContext:
    engine: AsyncLLM
    model_name: str
    aliases: frozenset[str]
    max_logprobs: int
    limits: ServerLimits
    auto_tools: bool = False      # --enable-auto-tool-choice with a --tool-call-parser

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")


def json_response(obj) -> Response:
    return Response(_json.encode(obj), media_type="application/json")


def sse_event(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stream_error_event(exc: Exception) -> bytes:
    """What a stream ends with when its request fails after the status line went out."""
    return sse_event(error_body(str(exc), "InternalServerError", None, 500))


def add_prompts(engine: AsyncLLM, request_id: str, prompts: list[tuple[str | None, list[int]]],
                params: SamplingParams, fields) -> list[tuple[str, object]]:
    """Queue one engine request per prompt: [(engine request id, collector)]. If one is refused,
    the others are aborted and a ValueError becomes a 400."""
    added = []
    try:
        for p, (text, ids) in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{p}"
            added.append((engine_id, engine.add_request(engine_id, ids, params, prompt_text=text)))
    except BaseException as exc:
        for engine_id, _ in added:
            engine.abort(engine_id)
        if isinstance(exc, ValueError):
            raise bad_request(exc, fields) from None
        raise
    return added


async def merged_outputs(engine: AsyncLLM, added: list[tuple[str, object]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from the requests of several prompts, as they come. Leaving early
    aborts every request still running."""
    streams = [engine.stream(engine_id, collector) for engine_id, collector in added]
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(s)): p for p, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                p = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[p]))] = p
                yield p, output
    finally:
        for task in pending:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def until_done_or_disconnect(work, raw: Request):
    """Run a non-streaming request's work; None (its requests aborted) if the client left first. A
    dead engine core (or a core's failure of the request) while waiting is a 500."""
    async def disconnected():
        while (await raw.receive()).get("type") != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task   # its streams close, which aborts their requests
        logger.info("client disconnected: its requests were aborted")
        return None
    try:
        return task.result()
    except (EngineDeadError, RequestFailedError) as exc:   # the core (or one of several) failed it
        raise APIError(500, str(exc), "InternalServerError") from None
