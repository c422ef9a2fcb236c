"""The engine core in its own process: `python -m pagedllm.engine.core_proc`, started by
engine/client.py (CoreProcess) with its arguments on stdin.

The main thread runs a busy loop: apply what the front ends sent (new requests, aborts, named
calls), run a step, hand its outputs over; it blocks only when there is nothing to do. Two IO
threads own the sockets and the (de)serialisation, so the main thread never waits on a socket: one
receives from every front end on one PULL socket, one sends each front end (client) its own
requests' outputs on its own PUSH socket. The scheduler's stats go to every client with each step
and once more when the core falls idle (so gauges return to zero).

Lifecycle: the process ignores Ctrl-C (the front end drains first, then sends Shutdown) and exits
by itself when the process that started it is gone. If building the engine or a step fails, the
error is logged, every client gets a last message saying why, and the process exits with code 1;
the write end of the front ends' death pipe closes with it.
"""

import logging
import pickle
import queue
import sys
import threading
import time
from dataclasses import dataclass

import zmq

from pagedllm.config import EngineConfig
from pagedllm.core_types import (AbortRequests, AddRequests, EngineCoreOutputs, SchedulerStats, Shutdown,
                                 UtilityCall, UtilityResult)
from pagedllm.engine import serial
from pagedllm.engine.core import EngineCore
from pagedllm.models.loader import ModelSource
from pagedllm.processes import exit_with_parent, freeze_gc_heap, ignore_ctrl_c

logger = logging.getLogger("pagedllm.engine.core")


@dataclass
class CoreProcArgs:
    config: EngineConfig
    source: ModelSource
    input_address: str
    output_addresses: list[str]     # one per client
    parent_pid: int


class EngineCoreProc:
    def __init__(self, input_address: str, output_addresses: list[str]) -> None:
        self.core: EngineCore | None = None
        self.num_clients = len(output_addresses)
        self.client_of: dict[str, int] = {}     # request id -> client, with several clients
        self.stopping = False
        self.death_reason: str | None = None
        self._closing = False
        self._inputs: queue.Queue = queue.Queue()
        self._outputs: queue.Queue = queue.Queue()
        self._last_stats: SchedulerStats | None = None
        self._context = zmq.Context()
        threading.Thread(target=self._receive, args=(input_address,), name="pagedllm-core-input",
                         daemon=True).start()
        self._sender = threading.Thread(target=self._send, args=(output_addresses,), name="pagedllm-core-output",
                                        daemon=True)
        self._sender.start()

    # ---- IO threads -----------------------------------------------------------------------------
    def _receive(self, address: str) -> None:
        sock = self._context.socket(zmq.PULL)
        sock.bind(address)
        while True:
            self._inputs.put(serial.decode_input(sock.recv(copy=False).buffer))

    def _send(self, addresses: list[str]) -> None:
        socks = []
        for address in addresses:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)   # a slow (or gone) client never blocks the others
            sock.bind(address)
            socks.append(sock)
        while (item := self._outputs.get()) is not None:
            client, message = item
            sock = socks[client]
            # a PUSH socket without its client waits for it (a client may connect after the core is
            # ready); once the core is closing, a client that has gone gets nothing more
            while not sock.poll(0 if self._closing else 100, zmq.POLLOUT):
                if self._closing:
                    break
            else:
                sock.send(serial.encode(message), copy=False)
        for sock in socks:
            sock.close(linger=2000)   # deliver what is queued to clients still there, then let go

    # ---- the busy loop --------------------------------------------------------------------------
    def announce_ready(self) -> None:
        info = {"num_blocks": self.core.kv_cache.num_blocks}
        for client in range(self.num_clients):
            self._outputs.put((client, EngineCoreOutputs(engine_info=info)))

    def run(self) -> None:
        core = self.core
        while not self.stopping:
            if not core.has_work():
                self._publish_stats()
                self._handle(self._inputs.get())
            while not self._inputs.empty():
                self._handle(self._inputs.get_nowait())
            if core.has_work() and not self.stopping:
                self._publish(core.step())

    def serve(self) -> int:
        """Announce readiness and run until told to stop; returns the process's exit code."""
        self.announce_ready()
        try:
            self.run()
        except BaseException as exc:  # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("the engine core died")
            self.die(exc)
            self.close()
            self.core.shutdown(graceful=False)
            return 1
        self.core.shutdown()
        self.close()
        return 0

    def _handle(self, message) -> None:
        if isinstance(message, AddRequests):
            if self.num_clients > 1:
                for r in message.requests:
                    self.client_of[r.request_id] = r.client_index
            self.core.add_requests(message.requests)
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
            for request_id in message.request_ids:
                self.client_of.pop(request_id, None)
        elif isinstance(message, UtilityCall):
            try:
                result = UtilityResult(message.call_id, self.core.call_utility(message.method, message.args))
            except Exception as exc:  # noqa: BLE001 - the caller's failure, not the engine's
                result = UtilityResult(message.call_id, error=f"{type(exc).__name__}: {exc}")
            self._outputs.put((message.client_index, EngineCoreOutputs(utility_results=[result])))
        elif isinstance(message, Shutdown):
            self.stopping = True

    def _publish(self, outputs: EngineCoreOutputs) -> None:
        stats = self._last_stats = self.core.make_stats()
        cached, evicted = self.core.take_block_events()
        parts = [outputs] if self.num_clients == 1 else self._split(outputs)
        for client, part in enumerate(parts):
            part.scheduler_stats, part.blocks_cached, part.blocks_evicted = stats, cached, evicted
            self._outputs.put((client, part))

    def _publish_stats(self) -> None:
        stats = self.core.make_stats()
        cached, evicted = self.core.take_block_events()
        if stats != self._last_stats or cached or evicted:
            self._last_stats = stats
            for client in range(self.num_clients):
                self._outputs.put((client, EngineCoreOutputs(scheduler_stats=stats, blocks_cached=cached,
                                                             blocks_evicted=evicted, timestamp=time.monotonic())))

    def _split(self, outputs: EngineCoreOutputs) -> list[EngineCoreOutputs]:
        """Each client's share of a step's outputs."""
        parts = [EngineCoreOutputs(timestamp=outputs.timestamp) for _ in range(self.num_clients)]
        client_of = self.client_of
        for request_id, token in zip(outputs.request_ids, outputs.new_token_ids):
            part = parts[client_of.get(request_id, 0)]
            part.request_ids.append(request_id)
            part.new_token_ids.append(token)
        for name in ("finished", "logprobs", "prompt_logprobs", "num_cached_tokens", "queue_time"):
            for request_id, value in getattr(outputs, name).items():
                getattr(parts[client_of.get(request_id, 0)], name)[request_id] = value
        for request_id in outputs.finished:
            client_of.pop(request_id, None)
        return parts

    def die(self, exc: BaseException) -> None:
        """Tell every client why the core stops (kept in death_reason for whoever started it)."""
        self.death_reason = f"{type(exc).__name__}: {exc}"
        for client in range(self.num_clients):
            self._outputs.put((client, EngineCoreOutputs(dead=self.death_reason)))

    def close(self) -> None:
        """Send what is queued to the clients still connected, then stop the sender."""
        self._closing = True
        self._outputs.put(None)
        self._sender.join(10.0)


def load_and_serve(proc: EngineCoreProc, config: EngineConfig, source: ModelSource) -> int:
    """Build the engine core for `proc` and serve until told to stop; returns the exit code. A core
    that cannot start tells its clients why (they raise it). Shared by main and the Ray actors
    (engine/ray_cores.py)."""
    try:
        proc.core = EngineCore.from_config(config, source)
    except BaseException as exc:  # noqa: BLE001 - reported to the clients, which raise it
        if not isinstance(exc, ValueError):
            logger.exception("the engine core could not start")
        proc.die(exc)
        proc.close()
        return 1
    freeze_gc_heap()
    return proc.serve()


def main(args: CoreProcArgs) -> int:
    ignore_ctrl_c()
    exit_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [engine core] %(name)s: %(message)s")
    return load_and_serve(EngineCoreProc(args.input_address, args.output_addresses), args.config, args.source)


if __name__ == "__main__":
    sys.exit(main(pickle.load(sys.stdin.buffer)))
