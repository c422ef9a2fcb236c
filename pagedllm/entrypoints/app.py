"""The OpenAI-compatible app: `build_app(engine, ...)` for one API process's AsyncLLM.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics, and the live dashboard. Errors are
OpenAI-style bodies (errors.py). A client that disconnects (streaming or not) aborts its request
at once. The app's lifespan waits for the engine core and starts handling its outputs.
"""

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

import pagedllm
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints import protocol
from pagedllm.entrypoints.chat import describe_tokenizer, render_chat
from pagedllm.entrypoints.dashboard import add_dashboard_routes
from pagedllm.entrypoints.errors import APIError, add_error_handlers, bad_request, error_response
from pagedllm.entrypoints.limits import BodyLimitMiddleware, ServerLimits
from pagedllm.entrypoints.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)
from pagedllm.entrypoints.serving import ServerContext, json_response
from pagedllm.entrypoints.serving_chat import create_chat_completion
from pagedllm.entrypoints.serving_completion import create_completion


class _APIKeyMiddleware:
    """Pure ASGI (keeps streaming and disconnect detection intact): /v1/* and the engine's controls
    need the key."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode("utf-8")

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] == "http" and (path.startswith("/v1") or path == "/reset_prefix_cache")
                and scope.get("method") != "OPTIONS"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):    # constant time: no timing side channel
                response = error_response(401, "Incorrect or missing API key.", "AuthenticationError")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, max_logprobs: int = 20,
              metrics=None, limits: ServerLimits | None = None, on_shutdown=None, auto_tools: bool = False) -> FastAPI:
    """The app for one AsyncLLM; `on_shutdown` (async) runs when the app stops; `auto_tools`: tool
    calls of tool_choice "auto" are parsed (--enable-auto-tool-choice)."""
    model = engine.config.model
    ctx = ServerContext(engine, model_name, frozenset({model_name, model.model}), max_logprobs,
                        limits or ServerLimits(), auto_tools)

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctx.limits.max_request_bytes)
    if api_key:   # added last, so it runs first: no body is read for a caller without the key
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    add_error_handlers(app)
    add_dashboard_routes(app, engine, model_name, api_key_required=bool(api_key))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, req, raw)

    @app.get("/health")
    async def health():
        """200 while the engine serves (with a lost core among several: 200, naming it); 503 once
        no core is left."""
        if not engine.is_healthy:
            return error_response(503, f"the engine core is not running: {engine.dead_error}",
                                  "ServiceUnavailableError")
        errors = engine.core_errors()
        if any(error is not None for error in errors):
            return json_response({"status": "degraded", "engines": [
                {"index": i, "running": error is None, **({"error": str(error)} if error else {})}
                for i, error in enumerate(errors)]})
        return Response(status_code=200)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Forget the cached prefix blocks no request is using (vLLM's; for benchmarks)."""
        await engine.call_utility("reset_prefix_cache")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            return Response(b"", media_type="text/plain")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return json_response({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": protocol.now(), "owned_by": "pagedllm",
            "root": model.model, "parent": None, "max_model_len": model.max_model_len}]})

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ctx.check_model(req.model)
        try:
            if req.messages is not None:
                tokens = render_chat(engine.tokenizer, req.messages, req.add_generation_prompt)
            elif req.prompt is not None:
                tokens = engine.tokenize(req.prompt, req.add_special_tokens)
            else:
                raise ValueError("prompt or messages is required")
        except ValueError as exc:
            raise bad_request(exc, {"prompt", "messages"}) from None
        return {"count": len(tokens), "max_model_len": model.max_model_len, "tokens": tokens}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer's configuration, in vLLM's shape (what remote-tokenizer clients such as
        lm-eval read: its class, special tokens and chat template)."""
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return json_response(describe_tokenizer(engine.tokenizer))

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        ctx.check_model(req.model)
        vocab = engine.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab})", param="tokens")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    return app
