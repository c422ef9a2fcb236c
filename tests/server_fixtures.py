"""One real `pagedllm serve` (subprocess, uvicorn, the bundled SmolLM2 GGUF) per test session.

Import the fixtures into a test module with `from server_fixtures import server  # noqa: F401`.
"""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

API_KEY = "test-key"
MODEL = "smollm2"
MAX_MODEL_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    api_key: str
    model: str
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


_shared: dict = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def server():
    """Each test module that imports this fixture gets its own session-scoped instance of it, so
    the process is shared through `_shared` and stopped when the last of them is torn down."""
    if _shared["server"] is None:
        _shared["gen"] = _serve()
        _shared["server"] = next(_shared["gen"])
    _shared["users"] += 1
    try:
        yield _shared["server"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["server"] = None
            _shared["gen"].close()


def _serve():
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(128 << 20),
           "--served-model-name", MODEL, "--api-key", API_KEY, "--uvicorn-log-level", "warning"]
    env = {**os.environ, "PAGEDLLM_API_KEY": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in 180 s")
        time.sleep(0.5)
    # drain the server's output so it never blocks on a full pipe
    import threading
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        yield Server(url, API_KEY, MODEL, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
