"""The front end's output processing, fed engine core outputs by hand: stop strings finish a
sequence here and are sent to the core as aborts; a request whose output processing fails ends
alone; --stream-interval spaces the deltas; a collector merges what its reader has not taken."""

import asyncio

import pytest

from pagedllm.core_types import EngineCoreOutputs
from pagedllm.engine.output_processor import OutputProcessor, RequestFailedError, RequestOutputCollector
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

BAD_TOKEN = 13


class LetterTokenizer:
    """Token t is the letter chr(97 + t % 26); decoding BAD_TOKEN fails."""

    def decode(self, ids, skip_special_tokens=True):
        if BAD_TOKEN in ids:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
        return "".join(chr(97 + t % 26) for t in ids)


def step(ids_tokens: dict[str, int], finished: dict | None = None) -> EngineCoreOutputs:
    return EngineCoreOutputs(request_ids=list(ids_tokens), new_token_ids=list(ids_tokens.values()),
                             finished=finished or {})


def test_stop_string_finishes_here_and_aborts_in_the_core():
    processor = OutputProcessor(LetterTokenizer())
    processor.add_request("r", None, [0], SamplingParams(n=2, stop=["cd"], output_kind="final"), 0.0)
    processor.process_outputs(step({"r#0": 1, "r#1": 4}))
    out = processor.process_outputs(step({"r#0": 2, "r#1": 5}))
    assert out.to_abort == [] and not out.outputs
    out = processor.process_outputs(step({"r#0": 3, "r#1": 6}))   # "bcd": r#0 hits the stop string
    assert out.to_abort == ["r#0"] and not out.outputs
    out = processor.process_outputs(step({"r#0": 9, "r#1": 7}, {"r#1": ("length", None)}))
    [final] = out.outputs
    assert final.finished and [(c.text, c.finish_reason, c.stop_reason) for c in final.outputs] == [
        ("b", "stop", "cd"), ("efgh", "length", None)]
    assert final.outputs[0].token_ids == [1, 2, 3]      # the token after the stop never arrives
    assert not processor.has_unfinished_requests()


def test_sequences_the_core_gave_up_on_fail_their_request_alone():
    """EngineCoreOutputs.errors (a grammar that could not compile, a data-parallel core that died):
    the request fails with the core's reason, its running siblings leave the core, others go on."""
    processor = OutputProcessor(LetterTokenizer())
    lost, kept = RequestOutputCollector(delta=True), RequestOutputCollector(delta=True)
    processor.add_request("lost", None, [0], SamplingParams(n=2, output_kind="delta"), 0.0, lost)
    processor.add_request("kept", None, [0], SamplingParams(output_kind="delta"), 0.0, kept)
    out = processor.process_outputs(EngineCoreOutputs(request_ids=["lost#1", "kept"], new_token_ids=[1, 1],
                                                      errors={"lost#0": "engine core 1 stopped"}))
    assert out.to_abort == ["lost#1"] and list(processor.requests) == ["kept"]
    with pytest.raises(RequestFailedError, match="engine core 1 stopped"):
        asyncio.run(lost.get())
    assert asyncio.run(kept.get()).outputs[0].token_ids == [1]


def test_a_failing_request_ends_alone():
    processor = OutputProcessor(LetterTokenizer())
    delta = SamplingParams(output_kind="delta")
    bad, good = RequestOutputCollector(delta=True), RequestOutputCollector(delta=True)
    processor.add_request("bad", None, [0], delta, 0.0, bad)
    processor.add_request("good", None, [0], delta, 0.0, good)
    out = processor.process_outputs(step({"bad": BAD_TOKEN, "good": 1}))
    assert out.to_abort == ["bad"] and list(processor.requests) == ["good"]
    with pytest.raises(RequestFailedError):
        asyncio.run(bad.get())
    processor.process_outputs(step({"bad": 2, "good": 2}, {"good": ("length", None)}))   # "bad" is ignored now
    output = asyncio.run(good.get())
    assert output.finished and output.outputs[0].text == "bc" and output.outputs[0].token_ids == [1, 2]


def test_stream_interval_spaces_the_deltas():
    processor = OutputProcessor(LetterTokenizer(), stream_interval=3)
    processor.add_request("r", None, [0], SamplingParams(output_kind="delta"), 0.0)
    sizes, text = [], ""
    for i in range(1, 9):
        out = processor.process_outputs(step({"r": i}, {"r": ("length", None)} if i == 8 else None))
        for o in out.outputs:
            sizes.append(len(o.outputs[0].token_ids))
            text += o.outputs[0].text
    assert sizes == [1, 3, 3, 1] and text == "bcdefghi"   # the first token at once, the rest at the end


def test_collector_merges_unread_deltas():
    collector = RequestOutputCollector(delta=True)

    def delta(tokens, finished=False):
        return RequestOutput("r", None, [0], None, [CompletionOutput(0, "x" * len(tokens), tokens,
                                                                     finish_reason="length" if finished else None)],
                             finished)

    collector.put(delta([1]))
    collector.put(delta([2, 3]))
    collector.put(delta([4], finished=True))
    merged = asyncio.run(collector.get())
    assert merged.finished and merged.outputs[0].token_ids == [1, 2, 3, 4] and merged.outputs[0].text == "xxxx"
    assert merged.outputs[0].finish_reason == "length"
    collector.put(delta([5]))
    collector.put(RuntimeError("engine gone"))
    collector.put(delta([6]))                # nothing replaces an error
    with pytest.raises(RuntimeError, match="engine gone"):
        asyncio.run(collector.get())
