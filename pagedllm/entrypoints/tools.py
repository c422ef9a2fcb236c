"""Tool calling in chat completions, as OpenAI's API and vLLM have it.

- The tools go to the model's chat template. A template with no place for them (the default
  SmolLM2's) gets them in a system message in the Hermes format its model family documents.
- `tool_choice`: "none" (tools shown, no calls parsed); "required" (a grammar from the tools'
  parameter schemas: a JSON array of {"name", "arguments"} calls, one to one per tool, so the
  arguments always parse and validate); a named function (a grammar from its parameter schema: the output
  is the arguments); "auto" (the model's own output, parsed by the Hermes parser: JSON objects in
  <tool_call>...</tool_call>; the server must be started with --enable-auto-tool-choice
  --tool-call-parser hermes, as vLLM requires).
- Streaming: a named call's arguments stream as they come; "required" and "auto" calls go out whole,
  each as soon as it is complete; text outside calls streams as content.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from pagedllm.sampling_params import StructuredOutputsParams

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_PARSERS = ("hermes",)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    mode: str                          # "none" | "auto" | "required" | "named"
    tools: list[dict]                  # OpenAI tool objects, as the chat template takes them
    name: str | None = None            # the named function
    structured: StructuredOutputsParams | None = None


def plan_tools(tools, tool_choice, auto_enabled: bool, parallel: bool | None = None) -> ToolPlan | None:
    """What the request's `tools` and `tool_choice` ask for (`parallel`: parallel_tool_calls).
    ValueError names the field."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return None
    tool_list = [t.model_dump(exclude_none=True) for t in tools]
    schemas = {t["function"]["name"]: t["function"].get("parameters") or _EMPTY_PARAMETERS for t in tool_list}
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in schemas:
            raise ValueError(f"tool_choice must name one of the tools ({', '.join(schemas)}), got {choice!r}")
        return ToolPlan("named", tool_list, name, StructuredOutputsParams(json=schemas[name]))
    if choice == "required":
        call = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                 "required": ["name", "arguments"], "additionalProperties": False} for name, schema in schemas.items()]
        # at most one call per tool (one in all without parallel calls): small models otherwise
        # tend to go on listing calls until the token limit
        most = 1 if parallel is False else len(call)
        return ToolPlan("required", tool_list, structured=StructuredOutputsParams(
            json={"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": call}}))
    if choice == "auto" and not auto_enabled:
        raise ValueError('tool_choice "auto" needs a server started with --enable-auto-tool-choice '
                         '--tool-call-parser hermes (or give tool_choice "none", "required" or a function)')
    return ToolPlan(choice, tool_list)


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """(the text outside well-formed <tool_call> blocks, the calls in them)."""
    calls = []
    for block in _CALL_RE.findall(text):
        try:
            call = json.loads(block)
            calls.append(_call(call["name"], call.get("arguments", {})))
        except (ValueError, KeyError, TypeError):
            continue
    content = _CALL_RE.sub("", text).strip() if calls else text
    return content, calls


def tool_calls_of(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """A finished choice's (content, tool calls)."""
    if plan.mode == "named":
        return None, [_call(plan.name, text)]
    if plan.mode == "required":
        try:
            return None, [_call(c["name"], c["arguments"]) for c in json.loads(text)]
        except (ValueError, KeyError, TypeError):
            return text, []          # cut short by max_tokens: no complete array to parse
    if plan.mode == "auto":
        content, calls = parse_hermes(text)
        return content or None, calls
    return text, []


@dataclass
class ToolCallStream:
    """A streamed choice under a tool plan: text deltas in, (content delta, tool-call deltas) out."""
    plan: ToolPlan
    text: str = ""
    sent: int = 0                 # characters of `text` already given out (as content or calls)
    calls: int = 0                # tool calls given out
    named_id: str | None = field(default=None)

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        self.text += delta
        if self.plan.mode == "named":
            return "", self._named(delta)
        if self.plan.mode == "required":
            return ("", []) if not finished else self._whole_calls()
        if self.plan.mode == "auto":
            return self._hermes(finished)
        return delta, []

    def _named(self, delta: str) -> list[dict]:
        if self.named_id is None:
            call = _call(self.plan.name, "")
            self.named_id = call["id"]
            self.calls = 1
            return [{"index": 0, **call, "function": {"name": self.plan.name, "arguments": delta}}]
        return [{"index": 0, "function": {"arguments": delta}}] if delta else []

    def _whole_calls(self) -> tuple[str, list[dict]]:
        content, calls = tool_calls_of(self.plan, self.text)
        self.calls = len(calls)
        return content or "", [{"index": i, **call} for i, call in enumerate(calls)]

    def _hermes(self, finished: bool) -> tuple[str, list[dict]]:
        content, deltas = "", []
        while True:
            rest = self.text[self.sent:]
            start = rest.find(TOOL_CALL_OPEN)
            if start < 0:
                # hold back a tail that may be the start of "<tool_call>"
                keep = 0 if finished else next((k for k in range(len(TOOL_CALL_OPEN) - 1, 0, -1)
                                                if rest.endswith(TOOL_CALL_OPEN[:k])), 0)
                content += rest[:len(rest) - keep]
                self.sent += len(rest) - keep
                return content, deltas
            end = rest.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                content += rest[:start]
                self.sent += start
                if finished:       # an unclosed call: give it out as text
                    content += self.text[self.sent:]
                    self.sent = len(self.text)
                return content, deltas
            block_end = end + len(TOOL_CALL_CLOSE)
            _, calls = parse_hermes(rest[start:block_end])
            content += rest[:start] if not calls else rest[:start].rstrip()
            deltas += [{"index": self.calls + i, **call} for i, call in enumerate(calls)]
            self.calls += len(calls)
            self.sent += block_end


def tools_system_message(tools: list[dict]) -> str:
    """The tools in Hermes' format, for a chat template that has no place for them."""
    listed = "\n".join(json.dumps(t) for t in tools)
    return ("# Tools\n\nYou can call functions to help with the user's request. Their signatures are "
            f"between <tools></tools>:\n<tools>\n{listed}\n</tools>\n\nTo call one, answer with a JSON "
            'object {"name": <function name>, "arguments": <its arguments>} between <tool_call></tool_call> '
            "tags, one block per call.")
