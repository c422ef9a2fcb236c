"""Data-parallel engine cores on Ray (data_parallel_backend="ray").

A local Ray cluster of two simulated nodes (one CPU each, all on the loopback address) runs
LLM(data_parallel_size=2, data_parallel_backend="ray"): one core lands on each node, greedy output
equals one engine's, more cores than the cluster has room for are refused with the reason, a core
whose actor is killed ends the run with EngineDeadError, and shutting down leaves no process behind.
Without Ray, asking for it says how to install it."""

import dataclasses
import os
import signal
import sys
import time
from contextlib import contextmanager

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine import ray_cores
from pagedllm.engine.client import EngineDeadError
from pagedllm.engine.engine_args import EngineArgs
from server_fixtures import descendants, wait_gone

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@contextmanager
def _two_node_cluster(ray, monkeypatch):
    """A head and a worker node of one CPU each, with this process connected as the driver. Ray
    would advertise the machine's outward address: these settings keep every socket on 127.0.0.1."""
    from ray.cluster_utils import Cluster
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")      # for the processes Ray starts
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)   # for this one
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _outputs(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="session")
def ray():
    """Ray, or a skip that says how to get it (session-scoped: checked before smollm loads)."""
    return pytest.importorskip("ray", reason="needs Ray: pip install 'pagedllm[ray]'")


def test_ray_cores_one_per_node_match_one_engine(ray, smollm, monkeypatch):
    expected = _outputs(smollm)
    start = time.monotonic()
    others = descendants(os.getpid())     # processes of other tests' fixtures (a shared server), not Ray's
    with _two_node_cluster(ray, monkeypatch):
        node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        llm = LLM(data_parallel_size=2, data_parallel_backend="ray", max_model_len=512, kv_cache_memory=64 << 20)
        family = descendants(os.getpid()) - others     # the nodes' processes, the actors among them
        cores = [client.process for client in llm.llm_engine.engine_core.cores]
        try:
            assert {core.node_id for core in cores} == node_ids and len(node_ids) == 2, "one core on each node"
            assert all(core.input_address.startswith("tcp://127.0.0.1:") for core in cores)
            assert _outputs(llm) == expected, "greedy output differs from one engine's"
            three = dataclasses.replace(llm.llm_engine.config, data_parallel_size=3)
            with monkeypatch.context() as patch, pytest.raises(ValueError, match=r"data_parallel_size 3 .* no room"):
                patch.setattr(ray_cores, "START_TIMEOUT_S", 2.0)
                ray_cores.start_ray_cores(three, None, 1)     # the two cores hold both CPUs already
            os.kill(cores[1].pid, signal.SIGKILL)             # the actor dies: its death pipe ends
            with pytest.raises(EngineDeadError, match="Ray actor died"):
                llm.generate(PROMPTS, GREEDY, use_tqdm=False)
            assert not cores[1].is_running() and "Ray actor died" in cores[1].exit_status()
        finally:
            llm.shutdown()
        assert [core.stop() for core in cores] == [0, 1]      # idempotent: the codes of the first stop
    wait_gone(family)
    print(f"two Ray nodes, two cores, generate, kill, shut down: {time.monotonic() - start:.1f} s")


def test_without_ray_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'pagedllm\[ray\]'"):
        EngineArgs(data_parallel_size=2, data_parallel_backend="ray").create_config()


def test_cuda_cores_can_be_asked_for_from_a_head_without_cuda(ray):
    """The GPUs are on the Ray nodes: the head (this CPU machine) need not see any."""
    config, _ = EngineArgs(data_parallel_size=2, data_parallel_backend="ray", device="cuda",
                           tensor_parallel_size=3).create_config()   # SmolLM2: 9 heads, 3 KV heads
    assert (config.device, config.model.dtype, config.data_parallel_size) == ("cuda", "bfloat16", 2)
    with pytest.raises(ValueError, match="device 'cuda:1'"):
        EngineArgs(data_parallel_size=2, data_parallel_backend="ray", device="cuda:1").create_config()
    with pytest.raises(ValueError, match="CUDA is not available"):
        EngineArgs(device="cuda").create_config()
