"""POST /v1/chat/completions: the messages rendered with the model's chat template into one engine
request, n choices, streamed as server-sent events or returned whole."""

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagedllm.entrypoints import protocol
from pagedllm.entrypoints.chat import render_chat
from pagedllm.entrypoints.choices import ChatChoice
from pagedllm.entrypoints.errors import bad_request
from pagedllm.entrypoints.protocol import ChatCompletionRequest, random_id
from pagedllm.entrypoints.serving import (SSE_DONE, ServerContext, add_prompts, json_response, merged_outputs,
                                          sse_event, sse_response, stream_error_event, until_done_or_disconnect)
from pagedllm.entrypoints.tools import plan_tools

logger = logging.getLogger(__name__)

FIELDS = frozenset(ChatCompletionRequest.model_fields) | {"prompt"}


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    try:
        ctx.limits.check(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= ctx.max_logprobs:
            raise ValueError(f"top_logprobs must be in [0, {ctx.max_logprobs}], got {req.top_logprobs}")
        plan = plan_tools(req.tools, req.tool_choice, ctx.auto_tools, req.parallel_tool_calls)
        structured = req.structured_outputs_params()
        if structured is not None and plan is not None and plan.structured is not None:
            raise ValueError("tool_choice required or naming a function cannot be combined with a constraint on "
                             "the output (response_format, structured_outputs, guided_*)")
        ids = render_chat(ctx.engine.tokenizer, req.messages, req.add_generation_prompt,
                          req.continue_final_message, req.chat_template_kwargs, plan.tools if plan else None)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                     prompt_logprobs=None, max_logprobs=ctx.max_logprobs,
                                     structured_outputs=plan.structured if plan and plan.structured else structured)
    except ValueError as exc:
        raise bad_request(exc, FIELDS) from None
    request_id = random_id("chatcmpl")
    added = add_prompts(ctx.engine, request_id, [(None, ids)], params, FIELDS)
    choices = [ChatChoice(i, (req.top_logprobs or 0) if req.logprobs else None, req.return_token_ids, plan)
               for i in range(req.n)]
    head = {"id": request_id, "object": "chat.completion", "created": protocol.now(), "model": ctx.model_name}
    if req.stream:
        head["object"] = "chat.completion.chunk"
        return sse_response(_stream(ctx, added, choices, head, len(ids), req.include_usage))
    cached = await until_done_or_disconnect(_collect(ctx, added, choices), raw)
    if cached is None:
        return Response(status_code=499)
    body = {**head, "choices": [c.result() for c in choices],
            "usage": protocol.usage(len(ids), sum(c.num_tokens for c in choices), cached)}
    if req.return_token_ids:
        body["prompt_token_ids"] = ids
    return json_response(body)


async def _collect(ctx: ServerContext, added, choices: list[ChatChoice]) -> int:
    """Feed every output to its choice; returns the cached-token count."""
    cached = 0
    async with contextlib.aclosing(merged_outputs(ctx.engine, added)) as outputs:
        async for _, output in outputs:
            cached = output.num_cached_tokens
            for c in output.outputs:
                choices[c.index].update(c)
    return cached


async def _stream(ctx: ServerContext, added, choices: list[ChatChoice], head: dict, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choice_list, usage=None) -> bytes:
        obj = {**head, "choices": choice_list}
        if include_usage:
            obj["usage"] = usage
        return sse_event(obj)

    cached = 0
    try:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in choices])
        async with contextlib.aclosing(merged_outputs(ctx.engine, added)) as outputs:
            async for _, output in outputs:
                cached = output.num_cached_tokens
                for c in output.outputs:
                    piece = choices[c.index].update(c)
                    if piece is not None:
                        yield chunk([piece])
        if include_usage:
            yield chunk([], protocol.usage(prompt_tokens, sum(c.num_tokens for c in choices), cached))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        logger.exception("chat stream %s failed", head["id"])
        yield stream_error_event(exc)
    yield SSE_DONE
