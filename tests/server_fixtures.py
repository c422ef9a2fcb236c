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
                                 "--api-key", API_KEY, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    try:
        yield Server(url, API_KEY, MODEL, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> set[int]:
    """Every living process below pid (from /proc: children of children too)."""
    from pathlib import Path
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    from pathlib import Path
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes left behind: {[p for p in pids if alive(p)]}"
        time.sleep(0.2)


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
