"""LLMEngine: the offline front end behind `LLM`: input processing, an engine core (in this process,
or in its own with core_process=True; several in their own, with data_parallel_size > 1), output
processing. add_request / step / abort, as vLLM's.
"""

from pagedllm.config import EngineConfig
from pagedllm.engine.client import InprocClient, SyncMPClient, start_cores
from pagedllm.engine.dp_client import DPSyncClient
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer,
                 engine_core: InprocClient | SyncMPClient | DPSyncClient) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model.hf_config.vocab_size
        self.input_processor = InputProcessor(config, tokenizer)
        self.output_processor = OutputProcessor(tokenizer)
        self.engine_core = engine_core
        self._next_id = 0

    @classmethod
    def from_engine_args(cls, args) -> "LLMEngine":
        from pagedllm.engine.core import EngineCore
        from pagedllm.models.loader import load_tokenizer
        config, source = args.create_config()
        tokenizer = load_tokenizer(source)
        if config.data_parallel_size > 1:
            from pagedllm.engine.router import Router
            clients = [SyncMPClient(core) for core in start_cores(config, source, 1, args.data_parallel_backend)]
            router = Router(config.data_parallel_size, config.cache.block_size, args.routing,
                            capacity=config.scheduler.max_num_seqs)
            return cls(config, tokenizer, DPSyncClient(clients, router))
        if args.core_process:
            return cls(config, tokenizer, SyncMPClient.start(config, source))
        return cls(config, tokenizer, InprocClient(EngineCore.from_config(config, source)))

    def shutdown(self) -> None:
        """Stop the engine core and its workers (idempotent)."""
        if self.engine_core is not None:
            core, self.engine_core = self.engine_core, None
            core.shutdown()

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None, arrival_time: float | None = None) -> int:
        """Validate and queue a request (`prompt`: text or token ids); returns its prompt's length in
        tokens. Raises ValueError, naming the parameter, before anything reaches the engine core."""
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.input_processor.tokenize(prompt)
        else:
            token_ids = list(prompt)
        requests = self.input_processor.process(request_id, token_ids, params, arrival_time)
        self.output_processor.add_request(request_id, prompt_text, token_ids, params, requests[0].arrival_time)
        self.engine_core.add_requests(requests)
        return len(token_ids)

    def start_step(self) -> None:
        """Run an engine core step now (a core in this process steps only when asked), so that the
        device is at work while more requests are being added; its outputs come from the next step()."""
        self.engine_core.start_step()

    def abort_request(self, request_id: str) -> None:
        self.engine_core.abort_requests(self.output_processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine core step's outputs, as RequestOutputs (those with something to report)."""
        processed = self.output_processor.process_outputs(self.engine_core.get_output())
        if processed.to_abort:
            self.engine_core.abort_requests(processed.to_abort)
        if processed.failed:
            raise processed.failed[0][1]
        return processed.outputs

    # ---- named calls to the engine core(s) ----------------------------------------------------------
    def get_stats(self) -> dict:
        """The scheduler's counters and gauges (core_types.SchedulerStats, as a dict), added up
        over the cores (KV usage: their mean)."""
        stats = self.engine_core.call_each("get_stats")
        total = {key: sum(s[key] for s in stats) for key in stats[0]}
        total["kv_cache_usage"] /= len(stats)
        return total

    def reset_prefix_cache(self) -> bool:
        return all(self.engine_core.call_each("reset_prefix_cache"))

    def model_info(self) -> dict:
        return self.engine_core.call_each("model_info")[0]

    def kv_cache_state(self) -> dict:
        """The block pools' invariants checked, and their counts added up over the cores."""
        states = self.engine_core.call_each("kv_cache_state")
        return {key: (any if isinstance(states[0][key], bool) else sum)(s[key] for s in states) for key in states[0]}

    def record_steps(self, on: bool) -> list:
        """Start or stop logging step shapes; the steps logged since the last call (EngineCore),
        every core's."""
        return [step for steps in self.engine_core.call_each("record_steps", on) for step in steps]

    @property
    def model_runner(self):
        """Rank 0's model runner, for what needs the model itself (the HF baseline copies its
        weights; white-box tests); only where the engine core runs in this process."""
        if not isinstance(self.engine_core, InprocClient):
            raise RuntimeError("the model runner lives in the engine core's process (core_process=True)")
        return self.engine_core.core.executor.model_runner
