"""OpenAI API request models (pydantic) and response builders, in the exact OpenAI shapes.

Requests are validated by pydantic (wrong types -> 400 in the server), then mapped to
SamplingParams (whose ValueError, naming the parameter, also becomes a 400). Responses are plain
dicts built by the helpers below, shaped as the official `openai` SDK expects.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.engine.structured_output import grammar_of
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")   # unknown fields are ignored, as vLLM and OpenAI do


class StreamOptions(OpenAIBase):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JSONSchemaFormat(OpenAIBase):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBase):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(OpenAIBase):
    """vLLM's `structured_outputs` request field."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(OpenAIBase):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)   # torch generators take a 64-bit seed
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False    # vLLM's: each choice (and streamed delta) also carries its token ids
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs, and its older guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint, from whichever spelling the request used (at most one). A
        ValueError starts with the field's name."""
        given = {name: getattr(self, name) for name in ("response_format", "structured_outputs", "guided_json",
                                                         "guided_regex", "guided_choice", "guided_grammar")}
        given = {name: value for name, value in given.items() if value is not None
                 and not (name == "response_format" and value.type == "text")}
        if len(given) > 1:
            raise ValueError(f"{next(iter(given))} cannot be combined with {', '.join(list(given)[1:])}: "
                             "give one way of constraining the output")
        if not given:
            return None
        name, value = next(iter(given.items()))
        try:
            params = _structured(name, value)
            grammar_of(params)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return params

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        max_logprobs: int, structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        logit_bias = None
        if self.logit_bias:
            logit_bias = {}
            for key, value in self.logit_bias.items():
                try:
                    logit_bias[int(key)] = value
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        top_k = self.top_k if self.top_k is not None else 0
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=0 if top_k == -1 else top_k,
            min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=logit_bias, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_outputs,
            output_kind="delta" if self.stream else "final", max_logprobs=max_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _structured(name: str, value) -> StructuredOutputsParams:
    if name == "response_format":
        if value.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if value.json_schema is None or value.json_schema.schema_ is None:
            raise ValueError("json_schema needs a schema")
        return StructuredOutputsParams(json=value.json_schema.schema_)
    if name == "structured_outputs":
        return StructuredOutputsParams(json=value.json_, regex=value.regex, choice=value.choice, grammar=value.grammar,
                                       json_object=value.json_object)
    kind = name[len("guided_"):]
    return StructuredOutputsParams(**{"json" if kind == "json" else kind: value})


class CompletionRequest(SamplingFields):
    prompt: list[int] | list[list[int]] | str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(OpenAIBase):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None    # an assistant's calls, sent back with their results
    tool_call_id: str | None = None                   # a tool message: the call it answers


class FunctionDefinition(OpenAIBase):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIBase):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(OpenAIBase):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]


# ---- response builders ---------------------------------------------------------------------------
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "BadRequestError", param: str | None = None,
               code: int | str | None = 400) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


FinishReason = Literal["stop", "length"]


def finish_reason(reason: str | None) -> str | None:
    """The engine's reasons are OpenAI's ("stop" / "length"); an abort is reported as "stop"."""
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"
