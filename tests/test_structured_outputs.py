"""Structured outputs and tool calling through the OpenAI API, on the real default model (SmolLM2)
and the session's server (started with --enable-auto-tool-choice --tool-call-parser hermes), driven
with the official `openai` SDK; the Hermes parser, the mask and the offline API on their own."""

import asyncio
import json
import re
from typing import Annotated, Literal

import openai
import pydantic
import pytest
import torch
from server_fixtures import server  # noqa: F401 - session fixture

from pagedllm import SamplingParams
from pagedllm.entrypoints.protocol import ChatTool
from pagedllm.entrypoints.tools import ToolCallStream, parse_hermes, plan_tools
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.worker.sampler import apply_grammar_bitmask

xgr = pytest.importorskip("xgrammar")


class Address(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=20)
    country: Literal["France", "Spain", "Italy", "Peru"]


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=120)
    hobbies: list[Literal["chess", "music", "hiking", "cooking"]] = pydantic.Field(max_length=3)
    address: Address


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": Weather.model_json_schema()}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}},
                                               "required": ["city"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)


def _gather(server, calls):  # noqa: F811
    """Run the coroutines (made from an AsyncOpenAI client) at once: they share the batch."""
    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(call(aclient) for call in calls))
    return asyncio.run(main())


def test_json_schema_outputs_parse_and_validate(server, client):  # noqa: F811
    def ask(i):
        return lambda c: c.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Invent person number {i}."}],
            response_format=PERSON_FORMAT, max_tokens=200, temperature=0.8, seed=i)
    outs = _gather(server, [ask(i) for i in range(20)])
    for out in outs:
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        Person.model_validate_json(out.choices[0].message.content)
    parsed = client.chat.completions.parse(model=server.model, messages=ASK[:0] + [
        {"role": "user", "content": "Invent a person."}], response_format=Person, max_tokens=200, seed=7)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    chunks = list(client.chat.completions.create(model=server.model, messages=[
        {"role": "user", "content": "Invent a person."}], response_format=PERSON_FORMAT, max_tokens=200,
        stream=True, seed=3))
    Person.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_json_object_choice_regex_and_guided_spellings(server, client):  # noqa: F811
    out = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Some JSON."}],
                                         response_format={"type": "json_object"}, max_tokens=200, seed=1)
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    choices = ["red", "green", "blue"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        text = client.completions.create(model=server.model, prompt="My favourite colour is", max_tokens=8,
                                         extra_body=extra).choices[0].text
        assert text in choices
    pattern = r"\d{3}-\d{4}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        text = client.completions.create(model=server.model, prompt="Call me at", max_tokens=12,
                                         extra_body=extra).choices[0].text
        assert re.fullmatch(pattern, text), text
    out = client.completions.create(model=server.model, prompt="A person:", max_tokens=200,
                                    extra_body={"guided_json": Person.model_json_schema()})
    Person.model_validate_json(out.choices[0].text)


def test_tool_choice_required_and_named_give_valid_calls(server):  # noqa: F811
    def ask(i, choice):
        return lambda c: c.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                   max_tokens=120, temperature=0.8, seed=i)
    named = {"type": "function", "function": {"name": "get_weather"}}
    outs = _gather(server, [ask(i, "required") for i in range(10)] + [ask(i, named) for i in range(10)])
    for k, out in enumerate(outs):
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            if call.function.name == "get_time":
                assert k < 10 and set(json.loads(call.function.arguments)) == {"city"}
            else:
                Weather.model_validate_json(call.function.arguments)
        if k >= 10:
            assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]


def test_tool_round_trip_and_streamed_calls(server, client):  # noqa: F811
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                           max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    answer = client.chat.completions.create(model=server.model, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # the same call streamed: the deltas reassemble to it
    chunks = list(client.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                                 max_tokens=120, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and {d.index for d in deltas} == {0}
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    chunks = list(client.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS,
                                                 tool_choice="required", max_tokens=120, temperature=0, stream=True))
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    whole = client.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0).choices[0].message.tool_calls
    assert [(d.function.name, d.function.arguments) for d in calls] == [
        (c.function.name, c.function.arguments) for c in whole]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_json"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_structured_requests_are_400(server, body, param):  # noqa: F811
    import httpx2 as httpx
    r = httpx.post(server.base_url + "/chat/completions", json={"messages": ASK, "max_tokens": 4, **body},
                   headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_constrained_rows_leave_unconstrained_outputs_alone(server, client):  # noqa: F811
    plain = dict(model=server.model, prompt="The history of Rome", max_tokens=24, temperature=0)
    alone = client.completions.create(**plain).choices[0].text

    def constrained(i):
        return lambda c: c.chat.completions.create(model=server.model, messages=[
            {"role": "user", "content": f"Invent person {i}."}], response_format=PERSON_FORMAT, max_tokens=60, seed=i)
    outs = _gather(server, [lambda c: c.completions.create(**plain)] + [constrained(i) for i in range(3)])
    assert outs[0].choices[0].text == alone
    metrics = __import__("httpx2").get(server.url + "/metrics", timeout=30).text
    assert re.search(r"pagedllm:structured_output_requests_total\{[^}]*\} [1-9]", metrics)


# ---- the pieces, on their own ----------------------------------------------------------------------
def test_hermes_parser_and_stream():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"city": "Lima"}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert parse_hermes("no calls <tool_call>{broken")[1] == []
    plan = plan_tools([ChatTool(**t) for t in TOOLS], "auto", auto_enabled=True)
    for size in (1, 3, 7, len(text)):         # any split of the text into deltas
        stream, content, streamed = ToolCallStream(plan), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            part, calls = stream.feed(piece, finished=k == len(pieces) - 1)
            content += part
            streamed += calls
        assert content.strip() == "Let me check." and [c["index"] for c in streamed] == [0, 1]
        assert [c["function"]["name"] for c in streamed] == ["get_weather", "get_time"]
    with pytest.raises(ValueError, match="--enable-auto-tool-choice"):
        plan_tools([ChatTool(**t) for t in TOOLS], None, auto_enabled=False)


def test_bitmask_forbids_exactly_the_masked_tokens():
    logits = torch.randn(3, 70)
    bitmask = torch.full((3, 3), -1, dtype=torch.int32)     # all allowed
    bitmask[1] = 0
    bitmask[1, 0] = 0b101                                    # row 1: tokens 0 and 2 only
    before = logits.clone()
    apply_grammar_bitmask(logits, bitmask, [1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed == [0, 2]


def test_offline_structured_outputs(smollm):
    schema = Person.model_json_schema()
    outs = smollm.generate(["A person:", "Another person:"], SamplingParams(
        max_tokens=200, temperature=0.7, seed=0, structured_outputs=StructuredOutputsParams(json=schema)))
    for out in outs:
        Person.model_validate_json(out.outputs[0].text)
    with pytest.raises(ValueError, match="structured_outputs"):
        smollm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))


def test_control_character_row_matches_xgrammar_layout():
    from pagedllm.engine.structured_output import _bitmask_row
    row = _bitmask_row(70, [0, 31, 32, 69])
    logits = torch.zeros(1, 70)
    apply_grammar_bitmask(logits, row.unsqueeze(0), [0])
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [0, 31, 32, 69]


def test_json_rows_keep_surrogates_out_of_strings(smollm):
    """xgrammar 0.2.9 accepts ED A0-BF xx (a UTF-8-encoded surrogate, three U+FFFD once decoded)
    inside a JSON string; after a token that ends in a lone ED byte the row must allow the
    continuations of a real character (80-9F) and none that start a surrogate (A0-BF)."""
    from types import SimpleNamespace

    from pagedllm.engine.structured_output import StructuredOutputManager
    tokenizer = smollm.llm_engine.tokenizer
    manager = StructuredOutputManager(lambda: tokenizer)
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"]}
    request = SimpleNamespace(request_id="r", grammar=None, is_finished=False,
                              sampling_params=SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)))
    manager.add(request)
    request.grammar.future.result()
    decoded = xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab
    byte_token = {b: decoded.index(bytes([b])) for b in (0xED, 0xAF, 0x80)}   # the single-byte tokens
    for token in tokenizer.encode('{"s": "', add_special_tokens=False) + [byte_token[0xED]]:
        assert manager.accept([request], [token]) == [True]
    words = manager.bitmask([request])[0][0]

    def allowed(token: int) -> bool:
        return bool((int(words[token // 32]) >> (token % 32)) & 1)
    assert allowed(byte_token[0x80]) and not allowed(byte_token[0xAF])
    matcher = xgr.GrammarMatcher(request.grammar.future.result())   # xgrammar alone would allow it
    for token in tokenizer.encode('{"s": "', add_special_tokens=False) + [byte_token[0xED]]:
        matcher.accept_token(token)
    assert matcher.accept_token(byte_token[0xAF])
    manager.shutdown()


def test_biased_towards_surrogates_outputs_still_validate(smollm):
    """End to end: the model pushed (logit_bias) towards a lone ED byte and then towards A0-BF
    bytes, inside strings with a maxLength. xgrammar alone lets the surrogates through (three U+FFFD
    each once decoded, so the strings outgrow their maxLength); the JSON rows' guard keeps them out."""
    decoded = xgr.TokenizerInfo.from_huggingface(smollm.llm_engine.tokenizer).decoded_vocab
    bias = {decoded.index(bytes([0xED])): 12.0, **{decoded.index(bytes([b])): 8.0 for b in range(0xA0, 0xC0)}}

    class Tags(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        tags: list[Annotated[str, pydantic.StringConstraints(max_length=6)]] = pydantic.Field(
            min_length=2, max_length=3)

    params = SamplingParams(max_tokens=80, temperature=1.0, seed=0, logit_bias=bias,
                            structured_outputs=StructuredOutputsParams(json=Tags.model_json_schema()))
    outs = smollm.generate([f"Tags {i}:" for i in range(8)], params)
    texts = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(texts) >= 4, [o.outputs[0].text for o in outs]
    assert any(re.search("[\ud000-\ud7ff]", t) for t in texts), texts   # ED was taken, and completed validly
    for text in texts:
        Tags.model_validate_json(text)
