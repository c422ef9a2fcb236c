"""Front ends to several engine cores (data parallelism): one connection per core, and a Router
that picks the core for each request (engine/router.py).

Both clients look like the one-core clients of engine/client.py (add_requests, abort_requests,
get_output, call_each, shutdown / close). Every core's messages update the router (the block
hashes it cached and evicted, its KV usage, the sequences that finished) before the front end
processes them.

Faults (server): a core that dies takes its unfinished requests with it (they end with an error,
sent through the normal output path as EngineCoreOutputs.errors), the router sends nothing more
there, and the other cores keep serving; when the last one dies, the client is dead as a
one-core client is. Offline, any core's death ends the run (EngineDeadError).
"""

import asyncio
import functools
import itertools
import logging

import zmq

from pagedllm.core_types import EngineCoreOutputs, EngineCoreRequest
from pagedllm.engine.client import AsyncMPClient, CoreAddresses, SyncMPClient, stop_cores
from pagedllm.engine.router import Router

logger = logging.getLogger(__name__)


def _route(router: Router, cores: list, requests: list[EngineCoreRequest]) -> None:
    """Send one request's sequences (they share the prompt) to the core the router picks."""
    core = router.route([r.request_id for r in requests], requests[0].prompt_token_ids)
    cores[core].add_requests(requests)


def _abort(router: Router, cores: list, request_ids: list[str]) -> None:
    by_core: dict[int, list[str]] = {}
    for request_id in request_ids:
        core = router.core_of(request_id)
        if core is not None:
            by_core.setdefault(core, []).append(request_id)
            router.finish(request_id)
    for core, ids in by_core.items():
        cores[core].abort_requests(ids)


def _observe(router: Router, core: int, message: EngineCoreOutputs) -> None:
    stats = message.scheduler_stats
    kv_usage, queued = (None, None) if stats is None else (stats.kv_cache_usage, stats.num_running + stats.num_waiting)
    router.observe(core, message.blocks_cached, message.blocks_evicted, kv_usage, queued)
    for request_id in itertools.chain(message.finished, message.errors):
        router.finish(request_id)
    message.engine_index = core


class DPAsyncClient:
    """One API process's connections to every core. `on_dead(error)` is called once, when the
    last core is gone."""

    def __init__(self, addresses: list[CoreAddresses], router: Router, on_dead) -> None:
        assert len(addresses) == router.num_cores
        self.client_index = addresses[0].client_index
        self.router = router
        self.cores = [AsyncMPClient(a, functools.partial(self._core_died, i)) for i, a in enumerate(addresses)]
        self._on_dead = on_dead
        self._queue: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()
        self._readers: list[asyncio.Task] = []
        self.dead_error: BaseException | None = None

    async def wait_ready(self) -> dict:
        """Wait for every core; one that cannot start fails them all (they share the configuration)."""
        infos = await asyncio.gather(*(core.wait_ready() for core in self.cores))
        failed = [core.dead_error for core in self.cores if core.dead_error is not None]
        if failed:
            self.mark_dead(failed[0])
            return infos[0]
        self._readers = [asyncio.create_task(self._read(i), name=f"pagedllm-core-{i}-reader")
                         for i in range(len(self.cores))]
        return infos[0]

    async def _read(self, index: int) -> None:
        core = self.cores[index]
        while core.dead_error is None:
            message = await core.get_output()
            if message.dead is None:
                _observe(self.router, index, message)
                self._queue.put_nowait(message)

    def _core_died(self, index: int, error: BaseException) -> None:
        lost = self.router.lose(index)
        if index < len(self._readers):
            self._readers[index].cancel()
        if not any(self.router.alive):
            self.dead_error = error
            self._on_dead(error)
            return
        logger.error("engine core %d stopped (%s): %d of its requests fail; %d cores still serve", index, error,
                     len(lost), sum(self.router.alive))
        reason = f"engine core {index} stopped: {error}"
        self._queue.put_nowait(EngineCoreOutputs(errors={s: reason for s in lost}, engine_index=index))

    def mark_dead(self, error: BaseException) -> None:
        for core in self.cores:
            core.mark_dead(error)

    def core_errors(self) -> list[BaseException | None]:
        """Each core's error, None for those running."""
        return [core.dead_error for core in self.cores]

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        _route(self.router, self.cores, requests)

    def abort_requests(self, request_ids: list[str]) -> None:
        _abort(self.router, self.cores, request_ids)

    async def get_output(self) -> EngineCoreOutputs:
        return await self._queue.get()

    async def call_each(self, method: str, *args) -> list:
        """Call every core; each one's result, or the exception it (or its death) raised."""
        return await asyncio.gather(*(core.call_utility(method, *args) for core in self.cores),
                                    return_exceptions=True)

    def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for core in self.cores:
            core.close()


class DPSyncClient:
    """Offline: blocking calls to every core (each in its own process)."""

    def __init__(self, clients: list[SyncMPClient], router: Router) -> None:
        self.cores = clients
        self.router = router
        self._poller = zmq.Poller()
        for client in clients:
            client.register(self._poller)
        self._next = itertools.cycle(range(len(clients)))
        try:
            for client in clients:
                client.wait_ready()
        except BaseException:
            self.shutdown()
            raise

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        _route(self.router, self.cores, requests)

    def start_step(self) -> None:
        """Nothing to do: each core steps in its own process as soon as it has requests."""

    def abort_requests(self, request_ids: list[str]) -> None:
        _abort(self.router, self.cores, request_ids)

    def get_output(self) -> EngineCoreOutputs:
        """The next message from any core (each core in turn when several have one)."""
        while True:
            for _ in range(len(self.cores)):
                index = next(self._next)
                message = self.cores[index].receive_nowait()
                if message is not None:
                    _observe(self.router, index, message)
                    return message
            self._poller.poll()

    def call_each(self, method: str, *args) -> list:
        """Every core's result, in core order."""
        return [client.call_utility(method, *args) for client in self.cores]

    def shutdown(self) -> None:
        stop_cores([client.process for client in self.cores])
        for client in self.cores:
            client.shutdown()
