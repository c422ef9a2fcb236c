"""The offline API: LLM(...).generate(prompts, sampling_params) and .chat(messages, ...)."""

import contextlib
from collections.abc import Sequence

from tqdm import tqdm

from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

PromptType = str | list[int] | dict
# generate() runs a step each time this many steps' worth of prompt tokens have been added, so that
# the device works while the rest are validated and queued (83-180 us a 1,024-token prompt on the
# H200's host): enough for a full step even when most of them are cached. (After one step's worth,
# the prefix benchmark's first step computed 5,120 tokens of 8,192, as the rest were cached.)
STEP_EVERY_BUDGETS = 4


class LLM:
    """vLLM-compatible offline inference. With no model, the bundled SmolLM2-135M-Instruct GGUF.

    The engine core runs in this process unless core_process=True puts it in its own. shutdown()
    (or leaving a `with LLM(...) as llm:` block, or dropping the last reference) stops it and any
    tensor-parallel workers, so another LLM can be built in the same process."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.llm_engine = None
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):   # best effort: at interpreter exit much is gone already
            self.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine core and the tensor-parallel workers now (idempotent)."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in input order.
        Prompts: text, token ids, {"prompt": ...} or {"prompt_token_ids": ...}, or a list of them."""
        prompts = _as_list(prompts)
        params_list = _params_list(sampling_params, len(prompts))
        ids = []
        queued = 0   # prompt tokens added since the last step
        enough = STEP_EVERY_BUDGETS * self.llm_engine.config.scheduler.max_num_batched_tokens
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = self.llm_engine.new_request_id()
                text, tokens = _split_prompt(prompt)
                queued += self.llm_engine.add_request(request_id, tokens if tokens is not None else text,
                                                      _final_only(params), prompt_text=text)
                ids.append(request_id)
                if queued >= enough:   # the device works on these while the next ones are added
                    self.llm_engine.start_step()
                    queued = 0
        except ValueError:
            for request_id in ids:
                self.llm_engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages need a chat template, and this model's tokenizer has none")
        prompts = [{"prompt_token_ids": tokenizer.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False,
            **(chat_template_kwargs or {}))} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
        while self.llm_engine.has_unfinished_requests():
            for output in self.llm_engine.step():
                if output.finished:
                    results[output.request_id] = output
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _params_list(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if len(sampling_params) != n:
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {n} prompts")
    return list(sampling_params)


def _split_prompt(prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], None
        raise ValueError("prompt dicts need 'prompt' or 'prompt_token_ids'")
    return None, list(prompt)


def _final_only(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace
    return params if params.output_kind == "final" else replace(params, output_kind="final")
