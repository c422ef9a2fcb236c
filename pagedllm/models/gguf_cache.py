"""What a GGUF file's metadata yields, parsed once and kept in the user's cache: its config and
tokenizer as a Hugging Face folder, and where each tensor's bytes lie in the file.

transformers reads config and tokenizer from the metadata, and the gguf package parses all of it
(for SmolLM2 about 100,000 vocabulary and merge strings, a numpy view each) in 4-6 s on a 2-core CPU,
also just to list the tensors. A server start did it five times: tokenizer and config in the API
process, config, structured-output tokenizer and weights in the engine core. Saved with
save_pretrained and a JSON index of the tensors, later loads read JSON and map the tensors' bytes.

The folder is keyed by the file's path, size and modification time and by the transformers version
(its GGUF conversion may change); it is built under a file lock and appears by an atomic rename, so
a process that finds it finds it complete. Location: $PAGEDLLM_CACHE_DIR,
else $XDG_CACHE_HOME/pagedllm, else ~/.cache/pagedllm.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1   # bump when what the folder holds changes


def cache_root() -> Path:
    if os.environ.get("PAGEDLLM_CACHE_DIR"):
        return Path(os.environ["PAGEDLLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedllm"


def folder_for(gguf_file: str) -> Path:
    """Where this file's config and tokenizer are (or will be) saved."""
    import transformers
    path = Path(gguf_file).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{FORMAT}"
    return cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def hf_folder(gguf_file: str, architectures: dict[str, str]) -> Path | None:
    """The saved folder, built from the GGUF on first use; None when it cannot be written (the
    caller then reads the GGUF itself). architectures: GGUF model type -> HF architecture, for
    configs that name none."""
    folder = folder_for(gguf_file)
    if (folder / "config.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as exc:
        logger.warning("cannot cache %s's config and tokenizer under %s (%s)", gguf_file, folder.parent, exc)
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # a server's processes start together: one builds, the rest wait
        if not (folder / "config.json").is_file():
            _build(Path(gguf_file), folder, architectures)
    return folder


def _build(path: Path, folder: Path, architectures: dict[str, str]) -> None:
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        _save(path, building, architectures)
        os.rename(building, folder)
        logger.info("saved %s's config and tokenizer to %s", path, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _save(path: Path, out: Path, architectures: dict[str, str]) -> None:
    read_tokenizer(str(path)).save_pretrained(out)
    read_config(str(path), architectures).save_pretrained(out)


def read_config(gguf_file: str, architectures: dict[str, str]):
    """The config from the GGUF's metadata (the slow parse), named architecture and all."""
    from transformers import AutoConfig
    folder, name = os.path.split(gguf_file)
    config = AutoConfig.from_pretrained(folder or ".", gguf_file=name)
    if not getattr(config, "architectures", None):
        config.architectures = [architectures.get(config.model_type, config.model_type)]
    return config


def read_tokenizer(gguf_file: str):
    """The tokenizer and chat template from the GGUF's metadata (the slow parse)."""
    from transformers import AutoTokenizer
    folder, name = os.path.split(gguf_file)
    return AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)


def tensors(gguf_file: str) -> list[tuple[str, int, np.ndarray]]:
    """(name, GGML quantization type, raw data as the gguf reader gives it: a read-only map of the
    file) for each tensor, from the saved index when there is one, else from gguf's reader (and the
    index saved for next time, if the config's folder exists)."""
    index = folder_for(gguf_file) / "tensors.json"
    if index.is_file():
        entries = json.loads(index.read_text())
    else:
        import gguf
        entries = [dict(name=t.name, type=int(t.tensor_type), offset=int(t.data_offset), dtype=t.data.dtype.str,
                        shape=list(t.data.shape)) for t in gguf.GGUFReader(gguf_file).tensors]
        if index.parent.is_dir():
            _write_atomically(index, json.dumps(entries))
    return [(e["name"], e["type"], np.memmap(gguf_file, dtype=np.dtype(e["dtype"]), mode="r", offset=e["offset"],
                                             shape=tuple(e["shape"]))) for e in entries]


def _write_atomically(path: Path, text: str) -> None:
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".writing-", delete=False) as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError as exc:
        logger.warning("cannot save %s (%s)", path, exc)
