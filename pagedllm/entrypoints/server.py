"""The OpenAI-compatible HTTP server: FastAPI app factory `build_app(engine, ...)` and `run_server(args)`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics. Every error is an OpenAI-style body
{"error": {"message", "type", "param", "code"}}: 400 for bad input (pydantic errors included,
never 422), 401 for a wrong API key on /v1/*, 404 for an unknown model or route, 503 when the
engine loop is dead. A client that disconnects (streaming or not) aborts its request at once.
"""

import asyncio
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedllm
from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError
from pagedllm.entrypoints import protocol
from pagedllm.entrypoints.chat import render_chat
from pagedllm.entrypoints.limits import BodyLimitMiddleware, ServerLimits
from pagedllm.entrypoints.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest, error_body, finish_reason, random_id)

logger = logging.getLogger(__name__)

_NEG_FLOOR = -9999.0    # JSON has no -inf


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


_PARAM_RE = re.compile(r"^([a-z_]+)\b")


def _bad_request(exc: Exception, fields) -> APIError:
    message = str(exc) or exc.__class__.__name__
    match = _PARAM_RE.match(message)
    param = match.group(1) if match and match.group(1) in fields else None
    return APIError(400, message, "BadRequestError", param)


class _APIKeyMiddleware:
    """Pure ASGI (keeps streaming and disconnect detection intact): /v1/* needs the key."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope.get("method") != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):    # constant time: no timing side channel
                response = _error(401, "Incorrect or missing API key.", "AuthenticationError")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, served_model_name: str | None = None, api_key: str | None = None,
              max_logprobs: int = 20, metrics=None, limits: ServerLimits | None = None) -> FastAPI:
    """The app for one AsyncLLMEngine. Its lifespan starts the engine thread (and stops it)."""
    from contextlib import asynccontextmanager

    model_name = served_model_name or engine.engine.config.model.served_model_name or engine.engine.config.model.model
    max_model_len = engine.max_model_len
    _ = engine.tokenizer   # make the event loop's tokenizer copy now, not on the first request

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    limits = limits or ServerLimits()
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key:   # added last, so it runs first: no body is read for a caller without the key
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        parts, param = [], None
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                parts.append(f"malformed JSON body: {err.get('msg')}")
            else:
                if param is None and loc:
                    param = loc[0]
                parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return _error(400, "; ".join(parts) or "invalid request", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
        return _error(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("request failed")
        return _error(500, f"internal error: {exc!r}", "InternalServerError")

    @app.exception_handler(EngineDeadError)
    async def _dead(request, exc):
        return _error(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request, exc):
        response = _error(503, str(exc), "ServiceUnavailableError")
        response.headers["Retry-After"] = "1"
        return response

    aliases = {model_name, engine.engine.config.model.model}

    def check_model(name: str | None) -> None:
        if name is not None and name not in aliases:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    # ---- plain endpoints --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.is_healthy:
            return _error(503, f"engine loop is dead: {engine.dead_error!r}", "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": pagedllm.__version__}

    # the live dashboard: GET / and /dashboard (page), GET /dashboard/state (read-only JSON)
    from pagedllm.entrypoints.dashboard import add_dashboard_routes
    add_dashboard_routes(app, engine, model_name, api_key_required=bool(api_key))

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            return Response(b"", media_type="text/plain")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": protocol.now(), "owned_by": "pagedllm",
            "root": engine.engine.config.model.model, "parent": None, "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        try:
            if req.messages is not None:
                tokens = render_chat(engine.tokenizer, req.messages, req.add_generation_prompt)
            elif req.prompt is not None:
                tokens = _tokenize(engine, req.prompt, req.add_special_tokens)
            else:
                raise ValueError("prompt or messages is required")
        except ValueError as exc:
            raise _bad_request(exc, {"prompt", "messages"})
        return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = engine.engine.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab})", param="tokens")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    # ---- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        fields = set(CompletionRequest.model_fields)
        try:
            many = isinstance(req.prompt, list) and bool(req.prompt) and not isinstance(req.prompt[0], int)
            limits.check(req, len(req.prompt) if many else 1)
            if req.suffix:
                raise ValueError("suffix is not supported")
            if req.best_of is not None and req.best_of != req.n:
                raise ValueError("best_of is not supported (only best_of == n)")
            prompts = _completion_prompts(engine, req.prompt)
            params = req.sampling_params(
                max_tokens=16 if req.max_tokens is None else req.max_tokens, logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None,
                max_logprobs=max_logprobs)
        except ValueError as exc:
            raise _bad_request(exc, fields)
        request_id = random_id("cmpl")
        streams = await _add_all(engine, request_id, prompts, params, fields)
        created = protocol.now()
        if req.stream:
            return _sse(_completion_stream(engine, streams, prompts, req, request_id, created, model_name))
        results = await _collect(engine, streams, raw, req.n)
        if results is None:
            return Response(status_code=499)
        choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
        for p, (text, ids) in enumerate(prompts):
            acc = results[p]
            prompt_tokens += len(ids)
            cached += acc.num_cached_tokens
            for i in range(req.n):
                c = acc.choices[i]
                completion_tokens += len(c["token_ids"])
                out_text = c["text"]
                logprobs = None
                if req.logprobs is not None:
                    token_ids, lps = c["token_ids"], c["logprobs"]
                    if req.echo:
                        token_ids = ids + token_ids
                        lps = (acc.prompt_logprobs or [None] * len(ids)) + lps
                    logprobs = _completion_logprobs(engine, token_ids, lps, 0)
                if req.echo:
                    out_text = (text if text is not None else engine.tokenizer.decode(ids)) + out_text
                choices.append({"index": p * req.n + i, "text": out_text, "logprobs": logprobs,
                                "finish_reason": finish_reason(c["finish_reason"]), "stop_reason": c["stop_reason"]})
        return {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": protocol.usage(prompt_tokens, completion_tokens, cached)}

    # ---- chat completions -------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        fields = set(ChatCompletionRequest.model_fields) | {"prompt"}
        try:
            limits.check(req)
            if req.top_logprobs is not None and not req.logprobs:
                raise ValueError("top_logprobs needs logprobs set to true")
            if req.top_logprobs is not None and not 0 <= req.top_logprobs <= max_logprobs:
                raise ValueError(f"top_logprobs must be in [0, {max_logprobs}], got {req.top_logprobs}")
            ids = render_chat(engine.tokenizer, req.messages, req.add_generation_prompt,
                              req.continue_final_message, req.chat_template_kwargs)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = req.sampling_params(max_tokens=max_tokens,
                                         logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                         prompt_logprobs=None, max_logprobs=max_logprobs)
        except ValueError as exc:
            raise _bad_request(exc, fields)
        request_id = random_id("chatcmpl")
        prompts = [(None, ids)]
        streams = await _add_all(engine, request_id, prompts, params, fields)
        created = protocol.now()
        if req.stream:
            return _sse(_chat_stream(engine, streams[0], ids, req, request_id, created, model_name))
        results = await _collect(engine, streams, raw, req.n)
        if results is None:
            return Response(status_code=499)
        acc = results[0]
        choices, completion_tokens = [], 0
        for i in range(req.n):
            c = acc.choices[i]
            completion_tokens += len(c["token_ids"])
            logprobs = _chat_logprobs(c["token_ids"], c["logprobs"], req.top_logprobs or 0) if req.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": logprobs, "finish_reason": finish_reason(c["finish_reason"]),
                            "stop_reason": c["stop_reason"]})
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices,
                "usage": protocol.usage(len(ids), completion_tokens, acc.num_cached_tokens)}

    return app


# ---- helpers ----------------------------------------------------------------------------------------
def _tokenize(engine: AsyncLLMEngine, text: str, add_special_tokens: bool = True) -> list[int]:
    if engine.tokenizer is None:
        raise ValueError("prompt must be token ids: this model has no tokenizer")
    try:
        return engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates: the input's fault
        raise ValueError(f"prompt could not be tokenized: {exc}") from exc


def _completion_prompts(engine: AsyncLLMEngine, prompt) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt of a completions request."""
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise ValueError("prompt must not be empty")
    elif isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, _tokenize(engine, item)))
        else:
            out.append((None, list(item)))
    return out


async def _add_all(engine: AsyncLLMEngine, request_id: str, prompts, params, fields) -> list:
    """Add every prompt's request; if one is rejected, abort the others and answer 400."""
    streams = []
    try:
        for p, (text, ids) in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{p}"
            streams.append(await engine.add_request(engine_id, ids, params, prompt_text=text))
    except ValueError as exc:
        for stream in streams:
            engine.abort_stream(stream)
        raise _bad_request(exc, fields)
    except BaseException:
        for stream in streams:
            engine.abort_stream(stream)
        raise
    return streams


class _Accumulated:
    """One prompt's request, accumulated from delta outputs."""

    def __init__(self, n: int) -> None:
        self.choices = [{"text": "", "token_ids": [], "logprobs": [], "finish_reason": None,
                         "stop_reason": None} for _ in range(n)]
        self.prompt_logprobs = None
        self.num_cached_tokens = 0

    def add(self, output) -> None:
        self.prompt_logprobs = output.prompt_logprobs
        self.num_cached_tokens = output.num_cached_tokens
        for c in output.outputs:
            choice = self.choices[c.index]
            if choice["finish_reason"] is not None:
                continue
            choice["text"] += c.text
            choice["token_ids"].extend(c.token_ids)
            if c.logprobs:
                choice["logprobs"].extend(c.logprobs)
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason


async def _merge(engine: AsyncLLMEngine, streams) -> AsyncIterator[tuple[int, object]]:
    """(prompt index, output) from several request streams, as they come."""
    if len(streams) == 1:
        gen = engine.stream(streams[0])
        try:
            async for output in gen:
                yield 0, output
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(p, stream):
        try:
            async for output in engine.stream(stream):
                queue.put_nowait((p, output))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((p, exc))
        finally:
            queue.put_nowait((p, done))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            p, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            engine.abort_stream(stream)


async def _collect(engine: AsyncLLMEngine, streams, raw: Request, n: int) -> list[_Accumulated] | None:
    """Run non-streaming requests to the end; None (after aborting them) if the client left."""
    accs = [_Accumulated(n) for _ in streams]

    async def consume():
        gen = _merge(engine, streams)
        try:
            async for p, output in gen:
                accs[p].add(output)
        finally:
            await gen.aclose()

    async def disconnected():
        while True:
            message = await raw.receive()
            if message.get("type") == "http.disconnect":
                return

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            for stream in streams:
                engine.abort_stream(stream)
        watch.cancel()
    if not work.done() or work.cancelled():
        logger.info("client disconnected: aborted %s", [s.request_id for s in streams])
        return None
    work.result()   # re-raise a failure
    return accs


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_error(exc: Exception) -> str:
    status = 503 if isinstance(exc, EngineDeadError) else 500
    return _data(error_body(str(exc), "ServiceUnavailableError" if status == 503 else "InternalServerError",
                            None, status))


async def _completion_stream(engine, streams, prompts, req: CompletionRequest, request_id: str, created: int,
                             model_name: str) -> AsyncIterator[str]:
    n = req.n
    include_usage = req.include_usage
    started = set()
    finished = set()
    offsets: dict[int, int] = {}
    completion_tokens = 0
    cached = [0] * len(prompts)
    gen = _merge(engine, streams)
    try:
        async for p, output in gen:
            cached[p] = output.num_cached_tokens
            for c in output.outputs:
                index = p * n + c.index
                if index in finished:
                    continue
                text, token_ids, lps = c.text, list(c.token_ids), list(c.logprobs or [])
                completion_tokens += len(token_ids)
                if index not in started:
                    started.add(index)
                    if req.echo:
                        ptext, pids = prompts[p]
                        text = (ptext if ptext is not None else engine.tokenizer.decode(pids)) + text
                        if req.logprobs is not None:
                            token_ids = pids + token_ids
                            lps = (output.prompt_logprobs or [None] * len(pids)) + lps
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(engine, token_ids, lps, offsets.get(index, 0))
                    if logprobs["text_offset"]:
                        last = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                        offsets[index] = last
                reason = finish_reason(c.finish_reason)
                if reason is not None:
                    finished.add(index)
                if not text and not token_ids and reason is None:
                    continue
                chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                         "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": reason, "stop_reason": c.stop_reason}]}
                if include_usage:
                    chunk["usage"] = None
                yield _data(chunk)
        if include_usage:
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            yield _data({"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                         "choices": [], "usage": protocol.usage(prompt_tokens, completion_tokens, sum(cached))})
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        logger.exception("completion stream %s failed", request_id)
        yield _stream_error(exc)
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


async def _chat_stream(engine, stream, prompt_ids, req: ChatCompletionRequest, request_id: str, created: int,
                       model_name: str) -> AsyncIterator[str]:
    include_usage = req.include_usage
    finished = set()
    completion_tokens = 0
    cached = 0

    def chunk(choices, usage=None, with_usage=False):
        obj = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
               "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return _data(obj)

    gen = _merge(engine, [stream])
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        async for _, output in gen:
            cached = output.num_cached_tokens
            for c in output.outputs:
                if c.index in finished:
                    continue
                completion_tokens += len(c.token_ids)
                reason = finish_reason(c.finish_reason)
                if reason is not None:
                    finished.add(c.index)
                if not c.text and reason is None and not (req.logprobs and c.token_ids):
                    continue
                logprobs = _chat_logprobs(c.token_ids, c.logprobs or [], req.top_logprobs or 0) \
                    if req.logprobs else None
                delta = {"content": c.text} if c.text or reason is None else {}
                yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                              "stop_reason": c.stop_reason}])
        if include_usage:
            yield chunk([], protocol.usage(len(prompt_ids), completion_tokens, cached))
    except Exception as exc:  # noqa: BLE001
        logger.exception("chat stream %s failed", request_id)
        yield _stream_error(exc)
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


def _token_text(engine, token_id: int, entry) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return engine.tokenizer.decode([token_id]) if engine.tokenizer is not None else str(token_id)


def _lp(value: float) -> float:
    return max(value, _NEG_FLOOR)


def _completion_logprobs(engine, token_ids: list[int], logprobs: list, initial_offset: int) -> dict:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = initial_offset
    for token_id, position in zip(token_ids, logprobs):
        entry = position.get(token_id) if position else None
        token = _token_text(engine, token_id, entry)
        tokens.append(token)
        if position is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_lp(entry.logprob) if entry is not None else None)
            ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            top_logprobs.append({_token_text(engine, t, e): _lp(e.logprob) for t, e in ranked})
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _chat_logprobs(token_ids: list[int], logprobs: list, top_n: int) -> dict:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for token_id, position in zip(token_ids, logprobs):
        if not position:
            continue
        entry = position.get(token_id)
        token = entry.decoded_token if entry is not None and entry.decoded_token is not None else str(token_id)
        ranked = sorted((e for e in position.values() if e.rank is not None and e.rank <= top_n),
                        key=lambda e: e.rank)[:top_n]
        content.append({
            "token": token, "logprob": _lp(entry.logprob) if entry is not None else _NEG_FLOOR,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": e.decoded_token or "", "logprob": _lp(e.logprob),
                              "bytes": list((e.decoded_token or "").encode("utf-8"))} for e in ranked]})
    return {"content": content}


# ---- run --------------------------------------------------------------------------------------------
def build_engine(args):
    """(AsyncLLMEngine, EngineMetrics, model name) from parsed `pagedllm serve` arguments."""
    from pagedllm.engine.engine import LLMEngine
    from pagedllm.engine.engine_args import EngineArgs
    from pagedllm.engine.metrics import EngineMetrics
    from pagedllm.entrypoints.cli import engine_kwargs
    kwargs = engine_kwargs(args)
    llm_engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, served_model_name=args.served_model_name,
                                                       **kwargs))
    name = args.served_model_name or args.model or default_model_name(llm_engine.config.model.model)
    metrics = EngineMetrics(name, llm_engine.config.model.max_model_len)
    return AsyncLLMEngine(llm_engine, stats=metrics), metrics, name


def default_model_name(path: str) -> str:
    """The bundled GGUF is served as its file name, without the extension."""
    from pathlib import Path
    name = Path(path).name
    return name[:-5] if name.endswith(".gguf") else name


def run_server(args) -> None:
    """Serve until SIGTERM/SIGINT (exit 0 after the graceful shutdown) or until the engine loop dies
    (exit 1)."""
    import sys
    engine, metrics, name = build_engine(args)
    engine.max_waiting_requests = getattr(args, "max_waiting_requests", None)
    limits = ServerLimits(max_request_bytes=getattr(args, "max_request_bytes", 1 << 20),
                          max_n=getattr(args, "max_n", 16))
    app = build_app(engine, served_model_name=name, api_key=args.api_key, max_logprobs=args.max_logprobs,
                    metrics=metrics, limits=limits)
    logger.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
    code = serve(app, engine, args.host, args.port, log_level=args.uvicorn_log_level,
                 shutdown_timeout=getattr(args, "shutdown_timeout", 30.0))
    if code:
        sys.exit(code)


def serve(app, engine: AsyncLLMEngine, host: str, port: int, log_level: str = "info",
          shutdown_timeout: float = 30.0, watch_interval: float = 0.5) -> int:
    """Run uvicorn; return the exit code: 0 after a graceful shutdown, 1 if the engine loop died.

    SIGTERM (and SIGINT): uvicorn stops listening, closes idle connections, lets requests in flight
    finish for `shutdown_timeout` seconds, then cancels what is left (which aborts those requests).
    A watchdog thread stops the server as soon as the engine loop dies, so the process exits instead
    of answering 503 forever (a supervisor restarts it)."""
    import signal
    import threading
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=shutdown_timeout))
    stop = threading.Event()

    def watchdog() -> None:
        while not stop.wait(watch_interval):
            if engine.dead_error is not None:
                logger.error("engine loop died (%r): shutting the server down", engine.dead_error)
                server.should_exit = True
                return

    watcher = threading.Thread(target=watchdog, name="pagedllm-watchdog", daemon=True)
    watcher.start()
    # uvicorn re-raises the signal it caught once it has shut down, which would end the process by
    # the signal (exit -15, or a KeyboardInterrupt traceback for Ctrl-C); with these handlers in
    # place as the "original" ones, SIGTERM or SIGINT after the graceful shutdown is a clean exit 0.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        stop.set()
        engine.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.dead_error is not None:
        return 1
    return 0
