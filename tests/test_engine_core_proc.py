"""The engine core behind its sockets, without a model: the message types round-trip through the
serializer; one or two front ends (AsyncLLM) reach an EngineCoreProc running here in a thread, get
only their own requests' outputs, and make named calls; a step that fails ends every request with
an error, logs the batch's request ids, and marks the engine dead; so does the core's process
exiting (the end of the death pipe)."""

import asyncio
import logging
import os
import threading

import pytest
from engine_fakes import FailingExecutor, InstantExecutor, dummy_config

from pagedllm.core_types import (AbortRequests, AddRequests, EngineCoreOutputs, EngineCoreRequest, SchedulerStats,
                                 Shutdown, UtilityCall, UtilityResult)
from pagedllm.engine import serial
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.client import CoreAddresses, EngineDeadError, request_shutdown
from pagedllm.engine.core import EngineCore
from pagedllm.engine.core_proc import EngineCoreProc
from pagedllm.sampling_params import SamplingParams

DELTA = SamplingParams(max_tokens=6, ignore_eos=True, output_kind="delta")


def test_messages_round_trip():
    params = SamplingParams(n=2, temperature=0.7, top_k=5, seed=3, stop=["x", "yz"], logit_bias={7: -1.5},
                            logprobs=2, stop_token_ids=[9])
    request = EngineCoreRequest("r#1", [1, 2, 3], params, 12.5, 1)
    for message in (AddRequests([request]), AbortRequests(["a", "b"]), UtilityCall(1, 7, "snapshot", [64]),
                    Shutdown()):
        assert serial.decode_input(serial.encode(message)) == message
    outputs = EngineCoreOutputs(
        request_ids=["a", "b"], new_token_ids=[4, 5], finished={"a": ("stop", "yz"), "b": ("length", None)},
        logprobs={"a": (-0.5, 1, [4, 6], [-0.5, -2.0])}, prompt_logprobs={"b": (0, [(-1.0, 2, [3], [-0.1])])},
        num_cached_tokens={"a": 16}, queue_time={"a": 0.25},
        scheduler_stats=SchedulerStats(num_running=2, kv_cache_usage=0.5, prefix_cache_hits=16, step_time=1.5),
        utility_results=[UtilityResult(7, {"blocks": [1, 2]}), UtilityResult(8, error="ValueError: no")],
        engine_info={"num_blocks": 10}, timestamp=3.0)
    assert serial.decode_outputs(serial.encode(outputs)) == outputs
    assert serial.decode_outputs(serial.encode(EngineCoreOutputs(dead="RuntimeError: x"))).dead == "RuntimeError: x"


class _Core:
    """An EngineCoreProc serving `clients` front ends from a thread, over ipc sockets in tmp_path."""

    def __init__(self, tmp_path, executor, clients: int = 1) -> None:
        self.config = dummy_config()
        self.input = f"ipc://{tmp_path}/in"
        outputs = [f"ipc://{tmp_path}/out-{i}" for i in range(clients)]
        self.proc = EngineCoreProc(self.input, outputs)
        self.proc.core = EngineCore(self.config, executor)
        self.read_fd, self.write_fd = os.pipe()   # the test holds the "process's" end of the death pipe
        self.addresses = [CoreAddresses(self.input, out, self.read_fd, i) for i, out in enumerate(outputs)]
        self.code = []
        self.thread = threading.Thread(target=lambda: self.code.append(self.proc.serve()), daemon=True)
        self.thread.start()

    def front_end(self, client: int = 0) -> AsyncLLM:
        return AsyncLLM(self.config, None, [self.addresses[client]])

    def stop(self) -> int:
        request_shutdown(self.input)
        self.thread.join(10)
        return self.code[0]


async def _collect(engine: AsyncLLM, request_id: str, prompt: list[int], params=DELTA) -> list[int]:
    tokens = []
    async for output in engine.generate(request_id, prompt, params):
        tokens += output.outputs[0].token_ids if output.outputs else []
    return tokens


def test_two_front_ends_share_one_core(tmp_path):
    core = _Core(tmp_path, InstantExecutor(num_blocks=256), clients=2)

    async def main():
        first, second = core.front_end(0), core.front_end(1)
        await asyncio.gather(first.start(), second.start())
        results = await asyncio.gather(*(_collect(first, f"a{i}", [1, 2, 3 + i]) for i in range(3)),
                                       *(_collect(second, f"b{i}", [4, 5, 6 + i]) for i in range(3)))
        assert [len(tokens) for tokens in results] == [6] * 6
        assert not first.output_processor.requests and not second.output_processor.requests
        stats = await second.call_utility("get_stats")
        assert stats["generation_tokens"] == 36 and stats["num_running"] == 0
        snapshot = await first.call_utility("snapshot")
        assert snapshot["counters"]["finished"] == 6 and len(snapshot["blocks"]["states"]) == 256
        with pytest.raises(RuntimeError, match="unknown engine core call"):
            await first.call_utility("shutdown")
        await first.shutdown()
        await second.shutdown()

    asyncio.run(main())
    assert core.stop() == 0


def test_aborts_and_stop_strings_reach_the_core(tmp_path):
    core = _Core(tmp_path, InstantExecutor(num_blocks=256))

    async def main():
        engine = core.front_end()
        await engine.start()
        stream = engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True, output_kind="delta"))
        await anext(stream)
        await stream.aclose()            # the client left: the core aborts the request at once
        for _ in range(100):
            if (await engine.call_utility("kv_cache_state"))["num_unfinished"] == 0:
                break
            await asyncio.sleep(0.01)
        kv = await engine.call_utility("kv_cache_state")
        assert kv["num_unfinished"] == 0 and kv["num_free_blocks"] == kv["num_blocks"]
        await engine.shutdown()

    asyncio.run(main())
    assert core.stop() == 0


def test_a_failing_step_ends_every_request_and_logs_its_batch(tmp_path, caplog):
    core = _Core(tmp_path, FailingExecutor(num_blocks=256, step_time=0.002))
    caplog.set_level(logging.ERROR)

    async def main():
        engine = core.front_end()
        await engine.start()
        ok = engine.generate("ok", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True, output_kind="delta"))
        await anext(ok)                  # running; then a request joins whose step fails
        with pytest.raises(EngineDeadError, match="injected model failure"):
            await _collect(engine, "boom", [4, 5, 6])
        with pytest.raises(EngineDeadError, match="injected model failure"):
            async for _ in ok:
                pass
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            engine.add_request("after", [1], DELTA)
        await engine.shutdown()

    asyncio.run(main())
    core.thread.join(10)
    assert core.code == [1]
    failed = [r.getMessage() for r in caplog.records if "the model failed" in r.getMessage()]
    assert failed and "'boom'" in failed[0] and "'ok'" in failed[0]


def test_the_core_process_exiting_marks_the_engine_dead(tmp_path):
    core = _Core(tmp_path, InstantExecutor(num_blocks=256))

    async def main():
        engine = core.front_end()
        dead = []
        engine.on_dead = lambda: dead.append(True)
        await engine.start()
        waiting = asyncio.ensure_future(_collect(engine, "r", [1, 2, 3], SamplingParams(
            max_tokens=1000, ignore_eos=True, output_kind="delta")))
        await asyncio.sleep(0.05)
        os.close(core.write_fd)          # as when the core's process is killed
        with pytest.raises(EngineDeadError):
            await waiting
        assert dead == [True] and not engine.is_healthy
        await engine.shutdown()

    asyncio.run(main())
    assert core.stop() == 0
