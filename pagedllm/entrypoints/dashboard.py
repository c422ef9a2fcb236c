"""The live engine dashboard: GET / and GET /dashboard (one self-contained page, shipped as
static/dashboard.html) and GET /dashboard/state (read-only JSON that the page polls).

The state is `engine.snapshot.engine_snapshot`, taken by each engine core between two of its steps
(the named call "snapshot"), so it is consistent and the server never touches blocks. It is
bounded: at most MAX_CELLS block cells and MAX_LISTED rows per queue, no prompt or output text.
Every engine core answers (data parallelism): "engines" lists them in core order, each {"index",
"alive", ...its snapshot} or, with no snapshot, {"index", "alive", "error"}; the top-level fields
stay those of the first core that answered, so one-core readers keep working.
Like /health and /metrics, these routes need no API key (the page asks for one to use its chat box
when the server has one).
"""

import asyncio
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

import pagedllm

SNAPSHOT_TIMEOUT_S = 10.0


def dashboard_html() -> str:
    return resources.files("pagedllm.entrypoints").joinpath("static/dashboard.html").read_text("utf-8")


def _engine_entry(index: int, result, error: BaseException | None) -> dict:
    """A lost core shows why it stopped; a live core whose call failed shows that failure. The flag
    is "alive", not "running": a snapshot's "running" is its list of running requests."""
    if error is not None:
        return {"index": index, "alive": False, "error": str(error) or type(error).__name__}
    if isinstance(result, BaseException):
        return {"index": index, "alive": True, "error": str(result) or type(result).__name__}
    return {"index": index, "alive": True, **result}


def engines_state(results: list, errors: list) -> dict:
    """`call_each("snapshot")`'s results and `core_errors()` -> the state: the first core with a
    snapshot at the top level (what the one-core page and other readers use) plus "engines".
    With no snapshot at all, the first core's exception is raised (as call_utility would)."""
    engines = [_engine_entry(i, result, errors[i] if i < len(errors) else None) for i, result in enumerate(results)]
    first = next((e for e in engines if "blocks" in e), None)
    if first is None:
        raise results[0] if isinstance(results[0], BaseException) else errors[0]
    top = {k: v for k, v in first.items() if k not in ("index", "alive")}
    return {**top, "engines": engines}


def add_dashboard_routes(app: FastAPI, engine, model_name: str, api_key_required: bool) -> None:
    html = dashboard_html()
    headers = {"Cache-Control": "no-store"}

    @app.get("/", include_in_schema=False)
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(html, headers=headers)

    @app.get("/dashboard/state")
    async def dashboard_state():
        results = await asyncio.wait_for(engine.call_each("snapshot"), SNAPSHOT_TIMEOUT_S)
        snap = engines_state(results, engine.core_errors())
        snap["server"] = {"model": model_name, "version": pagedllm.__version__, "healthy": engine.is_healthy,
                          "auth_required": api_key_required}
        return JSONResponse(snap, headers=headers)
