"""Data-parallel engine cores as Ray actors, on any node of a Ray cluster (data_parallel_backend="ray").

Each core runs what `python -m pagedllm.engine.core_proc` runs, inside a Ray actor placed in its
own bundle of one placement group (one CPU, plus tensor_parallel_size GPUs on CUDA; strategy
SPREAD: the cores go to as many nodes as have room, so a lost node takes as few cores as it can).
The actor binds its sockets on its node's IP as it starts, so the front ends reach it over ZMQ on
TCP exactly as they reach a local core over IPC.

RayCore is the front end's handle, with CoreProcess's interface (engine/client.py). Its death
pipe is local: a watcher thread in the process that started the cores holds the write end and
closes it when the actor's long-running serve() call returns or fails (the actor was killed, its
node went away), which the front ends read as "this core is gone".

Ray itself: an initialised Ray is used as it is; otherwise ray.init() connects to the cluster
that RAY_ADDRESS names or that `ray start` began on this machine, and starts a local Ray instance
when there is none (as vLLM does). The actors are not detached: Ray ends them with this process.
"""

import atexit
import contextlib
import logging
import os
import socket
import threading

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import disable_multicast
from pagedllm.engine.client import CoreAddresses, request_shutdown
from pagedllm.engine.engine_args import require_ray
from pagedllm.models.loader import ModelSource

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0   # for the cluster to find room for every core, and for the actors to start


class CoreActor:
    """One engine core in a Ray actor. Its sockets are bound (on free ports of its node's IP) as
    the actor starts, before any front end connects, so none misses the core's first or last word."""

    def __init__(self, core_index: int, num_clients: int) -> None:
        disable_multicast()      # before anything initialises CUDA or NCCL
        import ray
        from pagedllm.engine.core_proc import EngineCoreProc
        logging.basicConfig(level=logging.INFO,
                            format=f"%(asctime)s %(levelname)s [engine core {core_index}] %(name)s: %(message)s")
        ip = ray.util.get_node_ip_address()
        self.input_address, *self.output_addresses = [f"tcp://{ip}:{p}" for p in _free_ports(ip, num_clients + 1)]
        self.node_id = ray.get_runtime_context().get_node_id()
        self.proc = EngineCoreProc(self.input_address, self.output_addresses)

    def where(self) -> dict:
        """The core's input address, its output address for each client, its node and process."""
        return {"input_address": self.input_address, "output_addresses": self.output_addresses,
                "node_id": self.node_id, "pid": os.getpid()}

    def serve(self, config: EngineConfig, source: ModelSource) -> tuple[int, str | None]:
        """Load the model and serve until told to stop: the exit code, and why the core died (if it did)."""
        from pagedllm.engine.core_proc import load_and_serve
        return load_and_serve(self.proc, config, source), self.proc.death_reason


def _free_ports(ip: str, count: int) -> list[int]:
    """`count` distinct ports free on `ip` now (the engine core binds them right after)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((ip, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class _Placement:
    """The placement group of one start_ray_cores call (one bundle per core), removed when the
    last of its cores stops."""

    def __init__(self, ray, config: EngineConfig) -> None:
        from ray.util.placement_group import placement_group
        self.ray = ray
        self.bundle = {"CPU": 1.0}
        if config.device.startswith("cuda"):
            self.bundle["GPU"] = float(config.model.tensor_parallel_size)
        self.size = self.users = config.data_parallel_size
        self.actor_class = ray.remote(CoreActor)
        self.group = placement_group([dict(self.bundle) for _ in range(self.size)], strategy="SPREAD")
        if not self.group.wait(START_TIMEOUT_S):
            self.remove()
            raise ValueError(f"data_parallel_size {self.size} with data_parallel_backend 'ray': the Ray cluster had "
                             f"no room for {self.size} cores of {self.bundle} each in {START_TIMEOUT_S:.0f} s "
                             f"(available now: {ray.available_resources()})")

    def actor(self, index: int, num_clients: int):
        """Start core `index`'s actor in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)
        return self.actor_class.options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=strategy).remote(index, num_clients)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.remove()

    def remove(self) -> None:
        with contextlib.suppress(Exception):   # Ray already shut down: the group went with it
            self.ray.util.remove_placement_group(self.group)


class RayCore:
    """The handle of one engine core running in a Ray actor (CoreProcess's interface)."""

    def __init__(self, core_index: int, actor, where: dict, placement: _Placement, config: EngineConfig,
                 source: ModelSource) -> None:
        self.core_index = core_index
        self.input_address: str = where["input_address"]
        self.output_addresses: list[str] = where["output_addresses"]
        self.node_id: str = where["node_id"]      # the Ray node it runs on
        self.pid: int = where["pid"]              # its process, on that node
        self._actor = actor
        self._placement = placement
        self._code: int | None = None
        self._reason: str | None = None
        self._done = threading.Event()
        self._stopped = False
        self.death_fd, write_fd = os.pipe()
        serving = actor.serve.remote(config, source)
        threading.Thread(target=self._watch, args=(placement.ray, serving, write_fd),
                         name=f"pagedllm-ray-core-{core_index}", daemon=True).start()
        atexit.register(self.stop, 5.0)

    def _watch(self, ray, serving, write_fd: int) -> None:
        """Wait for the actor's serve() call; close the death pipe when it ends, however it ends."""
        try:
            self._code, self._reason = ray.get(serving)
        except BaseException as exc:  # noqa: BLE001 - the actor died: say how, then close the pipe
            self._code, self._reason = 1, f"Ray actor died: {type(exc).__name__}: {_first_line(exc)}"
        finally:
            self._done.set()
            os.close(write_fd)

    def addresses(self, client_index: int) -> CoreAddresses:
        return CoreAddresses(self.input_address, self.output_addresses[client_index], self.death_fd, client_index)

    def is_running(self) -> bool:
        return not self._done.is_set()

    def exit_status(self) -> str:
        if not self._done.is_set():
            return "running"
        return self._reason or f"code {self._code}"

    def request_stop(self) -> None:
        """Tell the core to stop after its step, without waiting (stop() waits)."""
        if self.is_running():
            request_shutdown(self.input_address)

    def stop(self, timeout: float = 30.0) -> int:
        """Tell the core to stop and wait for it, killing its actor after `timeout` s (the actor
        goes either way: its resources return to the cluster); returns 0 if it stopped cleanly,
        else 1 (idempotent)."""
        if not self._stopped:
            self._stopped = True
            if self._placement.ray.is_initialized():   # else Ray has shut down, and ended the actor
                self._stop_actor(timeout)
            self._placement.release()
        return 0 if self._code == 0 else 1

    def _stop_actor(self, timeout: float) -> None:
        self.request_stop()
        if not self._done.wait(timeout):
            logger.warning("engine core %d did not stop in %.0f s: killing its Ray actor", self.core_index, timeout)
        with contextlib.suppress(Exception):
            self._placement.ray.kill(self._actor)
        self._done.wait(5.0)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def start_ray_cores(config: EngineConfig, source: ModelSource, num_clients: int) -> list[RayCore]:
    """Place config.data_parallel_size engine cores in the Ray cluster (each loads the model on
    its node, from the same path: every node needs the model there) and start them serving
    `num_clients` front ends."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init()
    placement = _Placement(ray, config)
    actors = []
    try:
        actors = [placement.actor(i, num_clients) for i in range(config.data_parallel_size)]
        where = ray.get([actor.where.remote() for actor in actors], timeout=START_TIMEOUT_S)
    except BaseException:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        placement.remove()
        raise
    nodes = {w["node_id"] for w in where}
    logger.info("%d engine cores on %d Ray node%s", len(actors), len(nodes), "s" if len(nodes) > 1 else "")
    return [RayCore(i, actor, w, placement, config, source) for i, (actor, w) in enumerate(zip(actors, where))]
