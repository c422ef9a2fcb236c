"""What every benchmark result records: device, versions, commit, command; JSON + markdown out."""

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def environment() -> dict:
    import torch
    info = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "package": str(PACKAGE),
        "source_digest": source_digest(),
        "command": " ".join(["pagedllm"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("pagedllm")
        else " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment_variables": settings_in_environment(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


PACKAGE = Path(__file__).resolve().parents[1]
# environment variables that can change what a run measures (library choices, kernels, allocator, devices)
SETTING_PREFIXES = ("PAGEDLLM_", "TORCH_", "PYTORCH_", "CUDA_", "CUBLAS", "NCCL_", "TRITON_", "OMP_", "VLLM_")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")   # such variables are never recorded


def settings_in_environment(environ=os.environ) -> dict[str, str]:
    """The variables of SETTING_PREFIXES that are set (never one named like a secret, such as
    PAGEDLLM_API_KEY): an A/B run under TORCH_BLAS_PREFER_CUBLASLT=1, say, must say so in its result,
    not only in its file name."""
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(SETTING_PREFIXES) and not any(word in k for word in SECRET_WORDS)}


def source_digest(package: Path = PACKAGE) -> str:
    """A digest of the package's Python sources: which code ran, whatever $PAGEDLLM_COMMIT says.
    (`python -m` puts the working directory ahead of PYTHONPATH, so a run meant for another copy
    of the tree can silently import this one; the package path and this digest show it.)"""
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git_commit() -> str | None:
    """$PAGEDLLM_COMMIT if set (a copy of the tree, as on the GPU machine, may carry a stale or no
    .git), else HEAD with -dirty for uncommitted changes."""
    if os.environ.get("PAGEDLLM_COMMIT"):
        return os.environ["PAGEDLLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return "" if value is None else str(value)


OUTPUT_SUFFIXES = (".json", ".md", ".png")


def output_file(output: str | Path, suffix: str) -> Path:
    """<output><suffix>. A dot in the name is part of it ("latency-0.6b" -> "latency-0.6b.json"); only
    one of OUTPUT_SUFFIXES at its end is replaced."""
    path = Path(output)
    if path.suffix in OUTPUT_SUFFIXES:
        path = path.with_suffix("")
    return path.with_name(path.name + suffix)


def save(result: dict, output: str | None, table: str) -> None:
    """Print the table, and write <output>.json and <output>.md when an output path is given."""
    print(table)
    if not output:
        return
    json_path, md_path = output_file(output, ".json"), output_file(output, ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(table + "\n")
    print(f"wrote {json_path} and {md_path}")
