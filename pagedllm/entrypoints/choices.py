"""One choice of a completion or chat response, built from the engine's outputs for it: each
update() takes the next output (a delta when streaming, the one final output otherwise) and returns
what it adds, in the shape of a streamed chunk's choice; result() is the whole choice. Streaming and
non-streaming responses are built by the same code.

Logprobs take OpenAI's shapes: completions {tokens, token_logprobs, top_logprobs, text_offset},
chat {"content": [{token, logprob, bytes, top_logprobs}]}. JSON has no -inf: logprobs are floored.
"""

from pagedllm.entrypoints.protocol import finish_reason
from pagedllm.entrypoints.tools import ToolCallStream, ToolPlan, tool_calls_of
from pagedllm.outputs import CompletionOutput

NEG_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, NEG_FLOOR)


def _token_text(tokenizer, token_id: int, entry) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list, initial_offset: int) -> dict:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = initial_offset
    for token_id, position in zip(token_ids, logprobs):
        entry = position.get(token_id) if position else None
        token = _token_text(tokenizer, token_id, entry)
        tokens.append(token)
        if position is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_lp(entry.logprob) if entry is not None else None)
            ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            top_logprobs.append({_token_text(tokenizer, t, e): _lp(e.logprob) for t, e in ranked})
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(token_ids: list[int], logprobs: list, top_n: int) -> list[dict]:
    """OpenAI chat logprobs' content entries: [{token, logprob, bytes, top_logprobs: [...]}, ...]."""
    content = []
    for token_id, position in zip(token_ids, logprobs):
        if not position:
            continue
        entry = position.get(token_id)
        token = entry.decoded_token if entry is not None and entry.decoded_token is not None else str(token_id)
        ranked = sorted((e for e in position.values() if e.rank is not None and e.rank <= top_n),
                        key=lambda e: e.rank)[:top_n]
        content.append({
            "token": token, "logprob": _lp(entry.logprob) if entry is not None else NEG_FLOOR,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": e.decoded_token or "", "logprob": _lp(e.logprob),
                              "bytes": list((e.decoded_token or "").encode("utf-8"))} for e in ranked]})
    return content


class _Choice:
    """What every choice keeps: its text, token count and finish, and its token ids when the
    request asked for them (vLLM's return_token_ids)."""

    def __init__(self, index: int, return_token_ids: bool) -> None:
        self.index = index
        self.text = ""
        self.num_tokens = 0
        self.token_ids: list[int] | None = [] if return_token_ids else None
        self.finish_reason = self.stop_reason = None

    def _record(self, c: CompletionOutput) -> None:
        self.num_tokens += len(c.token_ids)
        self.finish_reason, self.stop_reason = finish_reason(c.finish_reason), c.stop_reason
        if self.token_ids is not None:
            self.token_ids += c.token_ids

    def _shaped(self, body: dict, token_ids: list[int]) -> dict:
        """A choice (or a streamed piece of one) with `body` and the fields every choice has."""
        out = {"index": self.index, **body, "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        if self.token_ids is not None:
            out["token_ids"] = token_ids
        return out


class CompletionChoice(_Choice):
    """A /v1/completions choice. `echo`: the prompt's (text, token ids), put before the output;
    `score_only`: the prompt alone is the answer (echo with max_tokens 0), the output is dropped."""

    def __init__(self, index: int, tokenizer, want_logprobs: bool, echo: tuple[str, list[int]] | None,
                 prompt_token_ids: list[int] | None = None, score_only: bool = False) -> None:
        super().__init__(index, prompt_token_ids is not None)
        self.tokenizer, self.echo, self.prompt_token_ids = tokenizer, echo, prompt_token_ids
        self.score_only = score_only
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} \
            if want_logprobs else None
        self.offset = 0

    def update(self, c: CompletionOutput, prompt_logprobs: list | None) -> dict | None:
        if self.score_only:
            c = CompletionOutput(c.index, "", [], finish_reason=c.finish_reason and "length")
        text, ids, lps = c.text, c.token_ids, c.logprobs or []
        if self.echo is not None:
            prompt_text, prompt_ids = self.echo
            self.echo = None
            text = prompt_text + text
            if self.logprobs is not None:
                ids, lps = prompt_ids + ids, (prompt_logprobs or [None] * len(prompt_ids)) + lps
        self._record(c)
        if not text and not ids and self.finish_reason is None:
            return None
        self.text += text
        logprobs = None
        if self.logprobs is not None:
            logprobs = completion_logprobs(self.tokenizer, ids, lps, self.offset)
            for key, values in logprobs.items():
                self.logprobs[key].extend(values)
            if logprobs["text_offset"]:
                self.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self._shaped({"text": text, "logprobs": logprobs}, c.token_ids)

    def result(self) -> dict:
        out = self._shaped({"text": self.text, "logprobs": self.logprobs}, self.token_ids)
        if self.token_ids is not None:
            out["prompt_token_ids"] = self.prompt_token_ids
        return out


class ChatChoice(_Choice):
    """A /v1/chat/completions choice; `top_logprobs` is None when logprobs were not asked for.
    Under a tool plan (entrypoints/tools.py), the text becomes content and tool calls."""

    def __init__(self, index: int, top_logprobs: int | None, return_token_ids: bool = False,
                 tool_plan: ToolPlan | None = None) -> None:
        super().__init__(index, return_token_ids)
        self.top_logprobs = top_logprobs
        self.content: list[dict] | None = [] if top_logprobs is not None else None
        self.tool_plan = tool_plan if tool_plan is not None and tool_plan.mode != "none" else None
        self.tool_stream = ToolCallStream(self.tool_plan) if self.tool_plan is not None else None

    def update(self, c: CompletionOutput) -> dict | None:
        self._record(c)
        wants_logprobs = self.content is not None
        self.text += c.text
        text, calls = c.text, []
        if self.tool_stream is not None:
            text, calls = self.tool_stream.feed(c.text, self.finish_reason is not None)
        if not text and not calls and self.finish_reason is None and not (wants_logprobs and c.token_ids):
            return None
        logprobs = None
        if wants_logprobs:
            content = chat_logprobs(c.token_ids, c.logprobs or [], self.top_logprobs)
            self.content.extend(content)
            logprobs = {"content": content}
        delta = {"content": text} if text or (self.finish_reason is None and not calls) else {}
        if calls:
            delta["tool_calls"] = calls
        if self.tool_stream is not None and self.tool_stream.calls:
            self._calls_made()
        return self._shaped({"delta": delta, "logprobs": logprobs}, c.token_ids)

    def _calls_made(self) -> None:
        """A choice that called tools and stopped ends with "tool_calls", as OpenAI's do."""
        if self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def result(self) -> dict:
        message = {"role": "assistant", "content": self.text}
        if self.tool_plan is not None:
            content, calls = tool_calls_of(self.tool_plan, self.text)
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
                self._calls_made()
        return self._shaped({"message": message,
                             "logprobs": {"content": self.content} if self.content is not None else None},
                            self.token_ids)
