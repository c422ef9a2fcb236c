"""OpenAI-style errors: every failure is {"error": {"message", "type", "param", "code"}} with its
HTTP status: 400 for bad input (pydantic's errors included, never 422), 401 for a wrong API key,
404 for an unknown model or route, 503 (with Retry-After when overloaded) when the engine cannot
take requests, 500 for anything unexpected."""

import logging
import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.async_llm import EngineOverloadedError
from pagedllm.engine.client import EngineDeadError
from pagedllm.entrypoints.protocol import error_body

logger = logging.getLogger(__name__)

_PARAM_RE = re.compile(r"^([a-z_]+)\b")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


def bad_request(exc: Exception, fields) -> APIError:
    """A 400 for a ValueError whose message starts with the parameter's name (when it is one of `fields`)."""
    message = str(exc) or exc.__class__.__name__
    match = _PARAM_RE.match(message)
    param = match.group(1) if match and match.group(1) in fields else None
    return APIError(400, message, "BadRequestError", param)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts, param = [], None
        for err in exc.errors()[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                parts.append(f"malformed JSON body: {err.get('msg')}")
            else:
                if param is None and loc:
                    param = loc[0]
                parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return error_response(400, "; ".join(parts) or "invalid request", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("request failed")
        return error_response(500, f"internal error: {exc!r}", "InternalServerError")

    @app.exception_handler(EngineDeadError)
    async def _dead(request, exc):
        return error_response(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request, exc):
        response = error_response(503, str(exc), "ServiceUnavailableError")
        response.headers["Retry-After"] = "1"
        return response
