"""The live engine dashboard: GET / and GET /dashboard (one self-contained page, shipped as
static/dashboard.html) and GET /dashboard/state (read-only JSON that the page polls).

The state is `engine.snapshot.engine_snapshot`, taken by the engine core between two of its steps
(the named call "snapshot"), so it is consistent and the server never touches blocks. It is
bounded: at most MAX_CELLS block cells and MAX_LISTED rows per queue, no prompt or output text.
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


def add_dashboard_routes(app: FastAPI, engine, model_name: str, api_key_required: bool) -> None:
    html = dashboard_html()
    headers = {"Cache-Control": "no-store"}

    @app.get("/", include_in_schema=False)
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(html, headers=headers)

    @app.get("/dashboard/state")
    async def dashboard_state():
        snap = await asyncio.wait_for(engine.call_utility("snapshot"), SNAPSHOT_TIMEOUT_S)
        snap["server"] = {"model": model_name, "version": pagedllm.__version__, "healthy": engine.is_healthy,
                          "auth_required": api_key_required}
        return JSONResponse(snap, headers=headers)
