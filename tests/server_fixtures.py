"""One real `pagedllm serve` (subprocess, uvicorn, the bundled SmolLM2 GGUF) per test session.

Import the fixtures into a test module with `from server_fixtures import server  # noqa: F401`.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from pagedllm.distributed.parallel_state import free_port  # noqa: F401 - re-exported for the tests

API_KEY = "test-key"
MODEL = "smollm2"
MAX_MODEL_LEN = 2048




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


def start_server(extra: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    """Start `pagedllm serve` with the given extra flags on a free loopback port and wait for
    /health; returns the process, its URL and the list its output is collected into."""
    import threading
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--served-model-name", MODEL, "--uvicorn-log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PAGEDLLM_API_KEY": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
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
            raise RuntimeError(f"server did not start in {timeout} s")
        time.sleep(0.3)
    lines: list[str] = []   # drained so the server never blocks on a full pipe
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, url, lines


def _serve():
    proc, url, _ = start_server(["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(128 << 20),
                                 "--api-key", API_KEY])
    try:
        yield Server(url, API_KEY, MODEL, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StandInEngine:
    """What AsyncLLMEngine needs of an engine, without a model: requests wait in `pending`
    (id -> steps taken) until a subclass's step() serves them."""

    def __init__(self) -> None:
        from types import SimpleNamespace
        self.config = SimpleNamespace(model=SimpleNamespace(model="fake", served_model_name=None, max_model_len=64))
        self.tokenizer = None
        self.vocab_size = 100
        self.states, self.pending, self.failed_requests = {}, {}, set()

    def shutdown(self, graceful=True):
        pass

    def add_request(self, request_id, prompt, params, prompt_text=None, arrival_time=None):
        self.pending[request_id] = 0

    def has_unfinished_requests(self):
        return bool(self.pending)

    def abort_request(self, request_id):
        self.pending.pop(request_id, None)
