"""CPU time the server spends per dashboard poll, HTTP included: starts `pagedllm serve` (the bundled
SmolLM2, idle), sends N sequential GET /health and N GET /dashboard/state, and divides the CPU time
of the API process and the engine core process (which takes the snapshot) together (utime + stime
from /proc, 10 ms ticks) by N.

    python benchmarks/dashboard_poll_cpu.py [N]
"""

import os
import socket
import subprocess
import sys
import time

try:
    import httpx2 as httpx
except ImportError:
    import httpx


def cpu_seconds(pid: int) -> float:
    """The process's CPU time plus that of its children that are still running (the engine core)."""
    total = 0.0
    for p in [pid] + [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]:
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
                             "--max-model-len", "2048", "--kv-cache-memory", str(128 << 20),
                             "--uvicorn-log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with httpx.Client(base_url=url) as client:
            for _ in range(20):
                client.get("/dashboard/state")
            for path in ("/health", "/dashboard/state"):
                cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
                for _ in range(n):
                    client.get(path)
                cpu_ms = 1e3 * (cpu_seconds(proc.pid) - cpu0) / n
                print(f"GET {path}: {cpu_ms:.2f} ms of server CPU per request, "
                      f"{1e3 * (time.perf_counter() - wall0) / n:.2f} ms wall")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
