"""How big the KV pool is: `kv_cache_memory` (alias --kv-cache-memory-bytes, as vLLM's) sets its bytes
per rank on CPU and GPU alike; without it a CPU pool gets 2 GiB and a GPU pool what the utilisation
share leaves, never more than is free."""

import argparse

import pytest

from pagedllm.engine.engine_args import EngineArgs
from pagedllm.worker import memory
from pagedllm.worker.memory import GiB, gpu_pool_budget


def test_gpu_pool_budget_by_utilisation_or_as_requested():
    assert gpu_pool_budget(None, by_utilization=40 * GiB, available=30 * GiB) == 30 * GiB   # what is free
    assert gpu_pool_budget(None, by_utilization=20 * GiB, available=30 * GiB) == 20 * GiB
    assert gpu_pool_budget(7 * GiB, by_utilization=20 * GiB, available=30 * GiB) == 7 * GiB  # replaces the share
    assert gpu_pool_budget(25 * GiB, by_utilization=20 * GiB, available=30 * GiB) == 25 * GiB
    with pytest.raises(ValueError, match=r"kv_cache_memory \(40.00 GiB\) is more than .* \(30.00 GiB\)"):
        gpu_pool_budget(40 * GiB, by_utilization=20 * GiB, available=30 * GiB)


def test_kv_cache_memory_reaches_the_config_under_both_names():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    model = ["Qwen/Qwen3-0.6B", "--load-format", "dummy", "--device", "cpu"]   # the bundled config
    for flag in ("--kv-cache-memory", "--kv-cache-memory-bytes"):
        config, _ = EngineArgs.from_cli_args(parser.parse_args([*model, flag, str(3 << 20)])).create_config()
        assert config.cache.kv_cache_memory == 3 << 20
    config, _ = EngineArgs.from_cli_args(parser.parse_args(model)).create_config()
    assert config.cache.kv_cache_memory is None and memory.cpu_pool_budget(config.cache) == 2 * GiB
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineArgs.from_cli_args(parser.parse_args([*model, "--kv-cache-memory", "0"])).create_config()
