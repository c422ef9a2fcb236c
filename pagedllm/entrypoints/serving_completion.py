"""POST /v1/completions: one engine request per prompt (text, token ids, or a list of either), n
choices each, streamed as server-sent events or returned whole."""

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagedllm.entrypoints import protocol
from pagedllm.entrypoints.choices import CompletionChoice
from pagedllm.entrypoints.errors import bad_request
from pagedllm.entrypoints.protocol import CompletionRequest, random_id
from pagedllm.entrypoints.serving import (SSE_DONE, ServerContext, add_prompts, json_response, merged_outputs,
                                          sse_event, sse_response, stream_error_event, until_done_or_disconnect)

logger = logging.getLogger(__name__)

FIELDS = frozenset(CompletionRequest.model_fields)


def completion_prompts(ctx: ServerContext, prompt) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt of a completions request."""
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise ValueError("prompt must not be empty")
    elif isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    return [(item, ctx.engine.tokenize(item)) if isinstance(item, str) else (None, list(item)) for item in items]


def _echo_text(ctx: ServerContext, text: str | None, ids: list[int]) -> str:
    if text is not None:
        return text
    if ctx.engine.tokenizer is None:
        raise ValueError("echo of a token-id prompt needs a tokenizer, and this model has none")
    return ctx.engine.tokenizer.decode(ids)


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    try:
        many = isinstance(req.prompt, list) and bool(req.prompt) and not isinstance(req.prompt[0], int)
        ctx.limits.check(req, len(req.prompt) if many else 1)
        if req.suffix:
            raise ValueError("suffix is not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        # max_tokens 0 with echo scores the prompt (as vLLM and OpenAI's legacy API do): it runs with one
        # output token, for its prompt logprobs, and the response leaves that token out
        score_only = req.echo and req.max_tokens == 0
        prompts = completion_prompts(ctx, req.prompt)
        echoes = [(_echo_text(ctx, text, ids), ids) if req.echo else None for text, ids in prompts]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = req.sampling_params(
            max_tokens=1 if score_only else max_tokens, logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None,
            max_logprobs=ctx.max_logprobs, structured_outputs=req.structured_outputs_params())
    except ValueError as exc:
        raise bad_request(exc, FIELDS) from None
    request_id = random_id("cmpl")
    added = add_prompts(ctx.engine, request_id, prompts, params, FIELDS)
    choices = [[CompletionChoice(p * req.n + i, ctx.engine.tokenizer, req.logprobs is not None, echo,
                                 ids if req.return_token_ids else None, score_only)
                for i in range(req.n)] for p, (echo, (_, ids)) in enumerate(zip(echoes, prompts))]
    head = {"id": request_id, "object": "text_completion", "created": protocol.now(), "model": ctx.model_name}
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    if req.stream:
        return sse_response(_stream(ctx, added, choices, head, prompt_tokens, req.include_usage))
    cached = await until_done_or_disconnect(_collect(ctx, added, choices), raw)
    if cached is None:
        return Response(status_code=499)
    flat = [c for per_prompt in choices for c in per_prompt]
    return json_response({**head, "choices": [c.result() for c in flat],
                          "usage": protocol.usage(prompt_tokens, sum(c.num_tokens for c in flat), sum(cached))})


async def _collect(ctx: ServerContext, added, choices) -> list[int]:
    """Feed every output to its choice; returns each prompt's cached-token count."""
    cached = [0] * len(added)
    async with contextlib.aclosing(merged_outputs(ctx.engine, added)) as outputs:
        async for p, output in outputs:
            cached[p] = output.num_cached_tokens
            for c in output.outputs:
                choices[p][c.index].update(c, output.prompt_logprobs)
    return cached


async def _stream(ctx: ServerContext, added, choices, head: dict, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    cached = [0] * len(added)
    try:
        async with contextlib.aclosing(merged_outputs(ctx.engine, added)) as outputs:
            async for p, output in outputs:
                cached[p] = output.num_cached_tokens
                for c in output.outputs:
                    piece = choices[p][c.index].update(c, output.prompt_logprobs)
                    if piece is None:
                        continue
                    chunk = {**head, "choices": [piece]}
                    if include_usage:
                        chunk["usage"] = None
                    yield sse_event(chunk)
        if include_usage:
            completion_tokens = sum(c.num_tokens for per_prompt in choices for c in per_prompt)
            yield sse_event({**head, "choices": [],
                             "usage": protocol.usage(prompt_tokens, completion_tokens, sum(cached))})
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        logger.exception("completion stream %s failed", head["id"])
        yield stream_error_event(exc)
    yield SSE_DONE
