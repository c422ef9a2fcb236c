"""Small helpers shared by the processes pagedllm starts (the engine core, tensor-parallel ranks)."""

import gc
import os
import signal
import threading
import time


def exit_with_parent(parent_pid: int) -> None:
    """End this process (exit code 1) once the process that started it is gone, so a killed
    server never leaves its engine core or ranks behind; the check runs in a daemon thread."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()


def ignore_ctrl_c() -> None:
    """Ctrl-C reaches the terminal's whole process group: a child leaves it to the process that
    started it, which drains and then stops the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def freeze_gc_heap() -> None:
    """Move every object alive now (the model, torch's and transformers' modules, the tokenizer:
    millions of them, never garbage) out of the garbage collector's reach. A full collection
    then walks only what the serving loop created, instead of pausing the step loop for tens of
    milliseconds at a time; vLLM's engine core and API server do the same after start-up."""
    gc.collect()
    gc.freeze()
