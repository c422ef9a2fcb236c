"""Chat messages -> prompt token ids, through the model's chat template.

transformers' `apply_chat_template` renders the template in a jinja2 ImmutableSandboxedEnvironment,
so a template (or message content) cannot reach Python internals. Template errors (for example a
template that raises on roles that do not alternate) become ValueError -> HTTP 400.
"""


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


def to_plain_messages(messages) -> list[dict]:
    out = []
    for message in messages:
        m = message if isinstance(message, dict) else message.model_dump(exclude_none=True)
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"messages role must be system, user, assistant, tool or developer, got {role!r}")
        item = {"role": role, "content": _content_text(m.get("content"))}
        if m.get("name"):
            item["name"] = m["name"]
        out.append(item)
    return out


def render_chat(tokenizer, messages, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use /v1/completions")
    plain = to_plain_messages(messages)
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("tokenize", "return_dict", "conversation", "tokenizer"):
        kwargs.pop(reserved, None)
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
