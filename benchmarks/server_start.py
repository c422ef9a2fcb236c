"""How long `pagedllm serve` (the default SmolLM2 GGUF unless flags say otherwise) takes from launch
to a 200 on /health, a few times in a row, with the tree in the working directory. The first start
in a fresh PAGEDLLM_CACHE_DIR also builds the GGUF cache (models/gguf_cache.py).
    python benchmarks/server_start.py [--starts N] [-- serve flags...]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
from tests.server_fixtures import start_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("flags", nargs="*", help="serve flags (after --)")
    args = parser.parse_args()
    for i in range(args.starts):
        started = time.monotonic()
        proc, _, _ = start_server(args.flags or ["--max-model-len", "512"])
        print(f"start {i + 1}: {time.monotonic() - started:.1f} s to /health", flush=True)
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
