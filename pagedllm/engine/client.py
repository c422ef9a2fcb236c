"""Engine core clients: how a front end reaches the engine core.

- InprocClient: the core in this process; get_output() runs one step (offline, the default).
- SyncMPClient: the core in its own process (CoreProcess), blocking calls (offline, opt-in).
- AsyncMPClient: the core in its own process, for the server's event loop; one API process is one
  client, and several of them can share one core.

Every client sees the same interface: add_requests, abort_requests, outputs, call_utility (a named
call the core runs between two steps) and call_each (the same on every core, as a list: one core's
here, every core's for the data-parallel clients of dp_client.py), shutdown. The core's death shows up as EngineDeadError: a
last message from it saying why, or the end of the death pipe, whose only write end the core's
process holds.
"""

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.core_types import (AbortRequests, AddRequests, EngineCoreOutputs, EngineCoreRequest, Shutdown,
                                 UtilityCall)
from pagedllm.distributed.parallel_state import NO_MULTICAST_ENV
from pagedllm.engine import serial
from pagedllm.models.loader import ModelSource

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core stopped (its process died, or a step failed); restart the server."""


def core_error(reason: str) -> Exception:
    """The error for the core's last message: a ValueError at start-up (bad configuration) stays one."""
    if reason.startswith("ValueError: "):
        return ValueError(reason[len("ValueError: "):])
    return EngineDeadError(f"the engine core stopped: {reason}")


# ---- in this process --------------------------------------------------------------------------------
class InprocClient:
    def __init__(self, core) -> None:
        self.core = core
        self._started: deque[EngineCoreOutputs] = deque()   # what start_step()'s steps returned

    def start_step(self) -> None:
        """Run a step now: the core launches it on the requests queued so far, then waits for the
        step before it, if one is in flight; its outputs come first from get_output()."""
        if self.core.has_work():
            self._started.append(self.core.step())

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self.core.add_requests(requests)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        if self._started:
            return self._started.popleft()
        if not self.core.has_work():
            raise RuntimeError("get_output() with nothing in the engine core")
        return self.core.step()

    def call_utility(self, method: str, *args):
        return self.core.call_utility(method, list(args))

    def call_each(self, method: str, *args) -> list:
        """The one core's result, as a list: the shape of DPSyncClient's."""
        return [self.call_utility(method, *args)]

    def shutdown(self) -> None:
        self.core.shutdown()


# ---- the core's own process ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreAddresses:
    """What one client needs to reach a running core (plain: it travels to API processes)."""
    input_address: str
    output_address: str
    death_fd: int
    client_index: int


class CoreProcess:
    """Starts `python -m pagedllm.engine.core_proc` for `num_clients` clients, and stops it. With
    data parallelism, core `core_index` sees only its own GPUs."""

    def __init__(self, config: EngineConfig, source: ModelSource, num_clients: int = 1, core_index: int = 0) -> None:
        self.core_index = core_index
        self.ipc_dir = tempfile.mkdtemp(prefix="pagedllm-")
        self.input_address = f"ipc://{self.ipc_dir}/input"
        self.output_addresses = [f"ipc://{self.ipc_dir}/output-{i}" for i in range(num_clients)]
        read_fd, write_fd = os.pipe()
        env = {**os.environ, **NO_MULTICAST_ENV, **core_device_env(config, core_index)}
        self.proc = subprocess.Popen([sys.executable, "-m", "pagedllm.engine.core_proc"], stdin=subprocess.PIPE,
                                     pass_fds=(write_fd,), env=env)
        os.close(write_fd)   # the core's process holds the only write end: it closes when the core exits
        self.death_fd = read_fd
        # imported here: `python -m pagedllm.engine.core_proc` must not find itself imported already
        from pagedllm.engine.core_proc import CoreProcArgs
        args = CoreProcArgs(config, source, self.input_address, self.output_addresses, os.getpid())
        self.proc.stdin.write(pickle.dumps(args))
        self.proc.stdin.close()
        atexit.register(self.stop, 5.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def addresses(self, client_index: int) -> CoreAddresses:
        return CoreAddresses(self.input_address, self.output_addresses[client_index], self.death_fd, client_index)

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def exit_status(self) -> str:
        return f"code {self.proc.wait()}"

    def request_stop(self) -> None:
        """Tell the core to stop after its step, without waiting (stop() waits)."""
        if self.proc.poll() is None:
            request_shutdown(self.input_address)

    def stop(self, timeout: float = 30.0) -> int:
        """Tell the core to stop (it finishes nothing: stop taking requests first) and wait for
        it, killing it after `timeout` s; returns its exit code (idempotent)."""
        if self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the engine core did not stop in %.0f s: killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        return self.proc.returncode


def start_cores(config: EngineConfig, source: ModelSource, num_clients: int = 1, backend: str = "mp") -> list:
    """Start config.data_parallel_size engine cores (they load the model at the same time): local
    processes (CoreProcess), or Ray actors anywhere in a Ray cluster (engine/ray_cores.py). Each
    handle gives addresses(client), death_fd, is_running(), request_stop() and stop()."""
    if backend == "ray":
        from pagedllm.engine.ray_cores import start_ray_cores
        return start_ray_cores(config, source, num_clients)
    return [CoreProcess(config, source, num_clients, i) for i in range(config.data_parallel_size)]


def stop_cores(cores: list, timeout: float = 30.0) -> list[int]:
    """Stop several cores at once (each is told first, then each is waited for); their exit codes."""
    for core in cores:
        core.request_stop()
    return [core.stop(timeout) for core in cores]


def core_device_env(config: EngineConfig, core_index: int) -> dict[str, str]:
    """The environment that gives data-parallel core `core_index` its own GPUs (tensor_parallel_size
    of them, in order, of those this process sees)."""
    if config.data_parallel_size == 1 or not config.device.startswith("cuda"):
        return {}
    tp = config.model.tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(config.data_parallel_size * tp)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[core_index * tp:(core_index + 1) * tp])}


def request_shutdown(input_address: str) -> None:
    """Tell the engine core listening there to stop (after the step it is in)."""
    context = zmq.Context()
    sock = _input_socket(context, input_address)
    sock.send(serial.encode(Shutdown()))
    sock.close(linger=1000)
    context.term()


def _input_socket(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)   # never block the sender: the core drains its input every step
    sock.connect(address)
    return sock


class SyncMPClient:
    """Blocking calls to a core in its own process (for LLM with core_process=True); wait_ready()
    before anything else (several cores can start loading at once first)."""

    def __init__(self, process: CoreProcess) -> None:
        self.process = process
        addresses = process.addresses(0)
        self._context = zmq.Context()
        self._input = _input_socket(self._context, addresses.input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.connect(addresses.output_address)
        self._death_fd = addresses.death_fd
        self._poller = zmq.Poller()
        self.register(self._poller)
        self._ids = itertools.count(1)
        self._pending: deque[EngineCoreOutputs] = deque()
        self.closed = False
        self.engine_info: dict | None = None

    @classmethod
    def start(cls, config: EngineConfig, source: ModelSource) -> "SyncMPClient":
        client = cls(CoreProcess(config, source))
        client.wait_ready()
        return client

    def wait_ready(self) -> None:
        """Wait for the core's first message (it has loaded the model); shuts down on failure."""
        try:
            self.engine_info = self._receive().engine_info
        except BaseException:
            self.shutdown()
            raise

    def register(self, poller: zmq.Poller) -> None:
        """Watch this core's outputs and death pipe with `poller`."""
        poller.register(self._output, zmq.POLLIN)
        poller.register(self._death_fd, zmq.POLLIN)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._input.send(serial.encode(AddRequests(requests)))

    def start_step(self) -> None:
        """Nothing to do: a core in its own process steps as soon as it has requests."""

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._input.send(serial.encode(AbortRequests(request_ids)))

    def get_output(self) -> EngineCoreOutputs:
        return self._pending.popleft() if self._pending else self._receive()

    def call_utility(self, method: str, *args):
        call_id = next(self._ids)
        self._input.send(serial.encode(UtilityCall(0, call_id, method, list(args))))
        while True:
            message = self._receive()
            mine = [r for r in message.utility_results if r.call_id == call_id]
            if message.request_ids or message.scheduler_stats is not None:
                self._pending.append(message)   # a step's outputs that came first: kept for get_output
            if mine:
                if mine[0].error is not None:
                    raise RuntimeError(f"engine core call {method} failed: {mine[0].error}")
                return mine[0].result

    def call_each(self, method: str, *args) -> list:
        """The one core's result, as a list: the shape of DPSyncClient's."""
        return [self.call_utility(method, *args)]

    def receive_nowait(self) -> EngineCoreOutputs | None:
        """The next message if one is there (None if not); raises if the core is gone."""
        if self._pending:
            return self._pending.popleft()
        return self._read(dict(self._poller.poll(0)))

    def _receive(self) -> EngineCoreOutputs:
        while (message := self._read(dict(self._poller.poll()))) is None:
            pass
        return message

    def _read(self, ready: dict) -> EngineCoreOutputs | None:
        if self._output in ready:
            message = serial.decode_outputs(self._output.recv(copy=False).buffer)
            if message.dead is not None:
                raise core_error(message.dead)
            return message
        if self._death_fd in ready:
            raise EngineDeadError(f"the engine core's process exited ({self.process.exit_status()})")
        return None

    def shutdown(self) -> None:
        if not self.closed:
            self._close()

    def _close(self) -> None:
        self.closed = True
        self.process.stop()
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        os.close(self._death_fd)


class AsyncMPClient:
    """One API process's connection to the core, on its event loop. `on_dead(error)` is called
    once, when the core is gone."""

    def __init__(self, addresses: CoreAddresses, on_dead) -> None:
        self.client_index = addresses.client_index
        self._context = zmq.asyncio.Context()
        # a blocking view of the same context for the input: its sends never wait (no high-water mark)
        self._input = _input_socket(zmq.Context.shadow(self._context.underlying), addresses.input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.connect(addresses.output_address)
        self._death_fd = addresses.death_fd
        self._on_dead = on_dead
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self.dead_error: BaseException | None = None

    async def wait_ready(self) -> dict:
        """Watch the death pipe from now on; wait for the core's first message."""
        asyncio.get_running_loop().add_reader(self._death_fd, self._death_pipe_readable)
        return (await self.get_output()).engine_info

    def _death_pipe_readable(self) -> None:
        if not os.read(self._death_fd, 1):   # end of file: the core's process has exited
            asyncio.get_running_loop().remove_reader(self._death_fd)
            self.mark_dead(EngineDeadError("the engine core's process exited"))

    def mark_dead(self, error: BaseException) -> None:
        if self.dead_error is not None:
            return
        self.dead_error = error
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        self._on_dead(error)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._input.send(serial.encode(AddRequests(requests)))

    def abort_requests(self, request_ids: list[str]) -> None:
        """(Also from requests cancelled while the server shuts down, after close().)"""
        if request_ids and self.dead_error is None and not self._input.closed:
            self._input.send(serial.encode(AbortRequests(request_ids)))

    async def get_output(self) -> EngineCoreOutputs:
        """The next message for this client; named calls' results are handed to their callers."""
        message = serial.decode_outputs((await self._output.recv(copy=False)).buffer)
        if message.dead is not None:
            self.mark_dead(core_error(message.dead))
        for result in message.utility_results:
            future = self._calls.pop(result.call_id, None)
            if future is not None and not future.done():
                if result.error is None:
                    future.set_result(result.result)
                else:
                    future.set_exception(RuntimeError(f"engine core call failed: {result.error}"))
        return message

    async def call_each(self, method: str, *args) -> list:
        """The one core's result (or the exception), as a list: the shape of DPAsyncClient's."""
        return await asyncio.gather(self.call_utility(method, *args), return_exceptions=True)

    def core_errors(self) -> list[BaseException | None]:
        return [self.dead_error]

    async def call_utility(self, method: str, *args):
        if self.dead_error is not None:
            raise self.dead_error
        call_id = next(self._ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._input.send(serial.encode(UtilityCall(self.client_index, call_id, method, list(args))))
        return await future

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):   # no running loop, or it closed already
            asyncio.get_running_loop().remove_reader(self._death_fd)
        self._input.close(linger=1000)
        self._output.close(linger=0)
        self._context.term()
