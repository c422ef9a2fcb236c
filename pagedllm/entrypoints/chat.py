"""Chat messages -> prompt token ids, through the model's chat template.

transformers' `apply_chat_template` renders the template in a jinja2 ImmutableSandboxedEnvironment,
so a template (or message content) cannot reach Python internals. Template errors (for example a
template that raises on roles that do not alternate) become ValueError -> HTTP 400.
"""

import json

from pagedllm.entrypoints.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tools_system_message


def _content_text(content) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"messages content part type {kind!r} is not supported (only 'text')")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError("messages content text parts need a string 'text'")
        texts.append(text)
    return "\n".join(texts)


def to_plain_messages(messages, native_tools: bool) -> list[dict]:
    """Plain dicts for the template. Tool calls and results stay as they are for a template that
    knows them (`native_tools`); for one that does not, they become text in the Hermes format."""
    out = []
    for message in messages:
        m = message if isinstance(message, dict) else message.model_dump(exclude_none=True)
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"messages role must be system, user, assistant, tool or developer, got {role!r}")
        item = {"role": role, "content": _content_text(m.get("content"))}
        if m.get("name"):
            item["name"] = m["name"]
        calls = [_plain_call(c) for c in m.get("tool_calls") or ()]
        if native_tools:
            if calls:
                item["tool_calls"] = calls
            if m.get("tool_call_id"):
                item["tool_call_id"] = m["tool_call_id"]
        else:
            if calls:
                item["content"] = "\n".join([item["content"]] * bool(item["content"]) + [
                    f"{TOOL_CALL_OPEN}\n{json.dumps(c['function'])}\n{TOOL_CALL_CLOSE}" for c in calls])
            if role == "tool":
                item["content"] = f"<tool_response>\n{item['content']}\n</tool_response>"
        out.append(item)
    return out


def _plain_call(call: dict) -> dict:
    """An assistant's tool call as templates take it: the arguments as an object."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("messages tool_calls need a function with a name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ValueError("messages tool_calls arguments must be JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template (with `tools`:
    given to the template, or to the model in a system message when the template has no place
    for them)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use /v1/completions")
    native_tools = "tools" in tokenizer.chat_template
    plain = to_plain_messages(messages, native_tools)
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("tokenize", "return_dict", "conversation", "tokenizer", "tools"):
        kwargs.pop(reserved, None)
    if tools and native_tools:
        kwargs["tools"] = tools
    elif tools:
        plain = _with_tools_in_system(plain, tools)
    if continue_final_message:
        add_generation_prompt = False
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - jinja errors, sandbox violations: the request's fault
        raise ValueError(f"messages could not be rendered with the chat template: {exc}") from exc
    # The template already holds the special tokens (BOS etc.); do not add them twice.
    try:
        return tokenizer(text, add_special_tokens=False).input_ids
    except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates in the messages
        raise ValueError(f"messages could not be tokenized: {exc}") from exc


def _with_tools_in_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    described = tools_system_message(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{described}"}] + messages[1:]
    return [{"role": "system", "content": described}] + messages


def describe_tokenizer(tokenizer) -> dict:
    """The tokenizer's own settings (file paths left out, values as JSON can hold them), its class,
    special tokens and chat template: vLLM's /tokenizer_info."""
    info = {}
    for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items():
        if key.endswith("_file") or key == "name_or_path":
            continue
        info[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    info.update(tokenizer.special_tokens_map)
    info.update(tokenizer_class=type(tokenizer).__name__, chat_template=getattr(tokenizer, "chat_template", None),
                vocab_size=len(tokenizer))
    return info
