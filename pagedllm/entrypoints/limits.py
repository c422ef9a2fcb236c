"""Per-request limits of the HTTP server, checked before anything reaches the engine.

Every limit answers with an OpenAI error body: 413 for a body over `max_request_bytes` (checked on the
raw ASGI stream, before the body is parsed, so a 10 MB prompt costs no JSON or tokenizer work), 400
with the offending parameter named for the rest. The defaults, and their `pagedllm serve` flags:

    --max-request-bytes   1 MiB   whole request body
    --max-n               16      choices per prompt (`n`; `best_of` must equal it)
    (fixed)               64      prompts in one /v1/completions request
    (fixed)               16      stop strings, each at most 256 characters
    (fixed)               256     stop_token_ids
    (fixed)               1024    logit_bias entries
    --max-logprobs        20      logprobs / top_logprobs (checked by SamplingParams)
"""

import math
from dataclasses import dataclass

from pagedllm.entrypoints.protocol import error_body


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 1 << 20
    max_n: int = 16
    max_prompts: int = 64
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024

    def check(self, req, num_prompts: int = 1) -> None:
        """Raise ValueError (its message starts with the parameter's name) for a request over a limit."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(req, name, None)
            if value is not None and not math.isfinite(value):   # JSON 1e999 parses as inf
                raise ValueError(f"{name} must be a finite number, got {value}")
        if isinstance(req.n, int) and req.n > self.max_n:
            raise ValueError(f"n must be <= {self.max_n} (this server's --max-n), got {req.n}")
        if num_prompts > self.max_prompts:
            raise ValueError(f"prompt may hold at most {self.max_prompts} prompts, got {num_prompts}")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > self.max_stop_strings:
            raise ValueError(f"stop may hold at most {self.max_stop_strings} strings, got {len(stop)}")
        for s in stop:
            if len(s) > self.max_stop_string_chars:
                raise ValueError(f"stop strings must be at most {self.max_stop_string_chars} characters, "
                                 f"got one of {len(s)}")
        if req.stop_token_ids and len(req.stop_token_ids) > self.max_stop_token_ids:
            raise ValueError(f"stop_token_ids may hold at most {self.max_stop_token_ids} ids, "
                             f"got {len(req.stop_token_ids)}")
        if req.logit_bias and len(req.logit_bias) > self.max_logit_bias:
            raise ValueError(f"logit_bias may hold at most {self.max_logit_bias} entries, got {len(req.logit_bias)}")


class BodyLimitMiddleware:
    """Pure ASGI: refuse a request body over `max_bytes` with 413 before the app reads it.

    A declared Content-Length over the limit is refused at once; a chunked body is read up to the
    limit and then refused. A body within the limit is handed on unchanged, and later `receive()`
    calls go to the client (so disconnect detection keeps working)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope, receive, send, size: str) -> None:
        from fastapi.responses import JSONResponse
        message = (f"request body is {size} bytes, over this server's limit of {self.max_bytes} bytes "
                   "(--max-request-bytes)")
        response = JSONResponse(error_body(message, "RequestTooLargeError", None, 413), status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send, str(declared))
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":     # the client left before sending it all
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes}")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
