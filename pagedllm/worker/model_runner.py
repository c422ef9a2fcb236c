"""Turns a SchedulerOutput into tensors, runs the model, and samples.

Owns the model, the KV pool's memory, the sampler and the worker's copy of the running requests
(worker/input_batch.py), which each step's SchedulerOutput updates. On CUDA it sizes the pool from
a profiled max-size step and runs steps through CUDA graphs (worker/cuda_graphs.py).

With tensor parallelism every rank has a ModelRunner over its share of the model and its own
InputBatch. Rank 0 (the engine core's) broadcasts each step's SchedulerOutput (the diff) with the
sampled values it has read back since the last step; the other ranks apply both, flatten the step
as rank 0 does and run the same forward through run_worker_step, so their collectives pair up, and
take rank 0's sampled tokens on the device as their next inputs.
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.core_types import PLACEHOLDER, ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import SINGLE, TPGroup
from pagedllm.layers.attention import AttentionMetadata, SharedPrefixes, select_backend
from pagedllm.models import loader
from pagedllm.models.registry import model_class
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker import memory
from pagedllm.worker.cuda_graphs import CudaGraphs
from pagedllm.worker.input_batch import CachedRequestState, InputBatch
from pagedllm.worker.sampler import Sampler, SamplingRow, apply_grammar_bitmask, prompt_logprobs
from pagedllm.worker.shared_prefix import SharedPrefixPlan, plan_shared_prefixes
from pagedllm.worker.transfer import to_device

logger = logging.getLogger(__name__)


def _append_placeholders(sampling: list[CachedRequestState]) -> list[int]:
    """Each sampling request's next token is row i of the step's samples, known on the host only
    once the step is read back; returns the indices of the placeholders in the output tokens."""
    for row, request in enumerate(sampling):
        request.output_token_ids.append(PLACEHOLDER)
        request.prev_row = row
    return [len(r.output_token_ids) - 1 for r in sampling]


def _is_range(values: list[int]) -> bool:
    """values == [0, 1, ..., len - 1]."""
    return values[-1] == len(values) - 1 and values == list(range(len(values)))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device-to-host copy (into pinned memory on CUDA) without waiting for it."""
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def _one_host_thread() -> None:
    """With the model on a GPU, the host's torch ops are small bookkeeping, and torch's CPU thread
    pool only gets in the way: its threads spin for a while after each parallel op, taking the
    cores that xgrammar's mask threads and the step loop need (on the H200 this alone moved
    structured outputs from 0.68-0.91 to 0.83-0.93 of unconstrained throughput). vLLM also runs its
    GPU workers with one thread; OMP_NUM_THREADS, when set, is left to decide."""
    if torch.get_num_threads() > 1:
        logger.info("torch CPU threads: %d -> 1 (the model runs on the GPU; set OMP_NUM_THREADS to choose)",
                    torch.get_num_threads())
        torch.set_num_threads(1)


@dataclass
class _Batch:
    input_ids: np.ndarray              # per token, int64
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens_q: list[int]            # per sequence
    seq_lens: list[int]
    block_tables: np.ndarray           # [sequences, blocks] int32, zero-padded
    logits_indices: list[int]          # rows of the hidden states to sample from
    # rows whose logits score the next prompt token, and per request (index in the step, first
    # prompt position scored, count) for prompt_logprobs
    prompt_rows: list[int] = field(default_factory=list)
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)
    # input positions holding a PLACEHOLDER, and the previous step's sample row that fills each
    pending_at: list[int] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)


class PendingStep:
    """A step issued to the device; result() waits for it, writes the sampled values over the
    requests' placeholders and returns plain Python values. A step with a request under a grammar
    waits for its token bitmask (needs_bitmask): its forward is on the device, and sample() issues
    the sampling once the engine core has the previous step's tokens and so the masks."""

    def __init__(self, sampling: list[CachedRequestState], prompt_logprobs: dict, on_tokens=None) -> None:
        self.sampling = sampling        # the requests that sample, each to end in this step's PLACEHOLDER
        self.prompt_logprobs = prompt_logprobs
        self.on_tokens = on_tokens      # with TP: told the values written over the placeholders
        self.tokens = None              # host tensor (pinned on CUDA), filled asynchronously
        self.logprobs = None            # None or (top-N per row, host tensors) likewise
        self.event = None
        self.indices: list[int] = []
        self._sample = None

    @property
    def needs_bitmask(self) -> bool:
        return self._sample is not None

    def sample(self, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Issue the deferred sampling with the grammar bitmask (int32 [sampling rows, words],
        on the host) applied to `rows`."""
        sample, self._sample = self._sample, None
        sample(bitmask, rows)

    def result(self) -> ModelRunnerOutput:
        assert self._sample is None, "the step's sampling was never issued"
        if self.event is not None:
            self.event.synchronize()
        request_ids = [r.request_id for r in self.sampling]
        out = ModelRunnerOutput(request_ids=request_ids, prompt_logprobs=self.prompt_logprobs)
        if self.tokens is not None:
            out.sampled_token_ids = self.tokens.tolist()
            for request, index, token in zip(self.sampling, self.indices, out.sampled_token_ids):
                request.output_token_ids[index] = token
            if self.on_tokens is not None:
                self.on_tokens(self.sampling, self.indices, out.sampled_token_ids)
        if self.logprobs is not None:
            wanted, tensors = self.logprobs
            chosen, ranks, top_ids, top_values = (t.tolist() for t in tensors)
            for i, (request_id, n) in enumerate(zip(request_ids, wanted)):
                if n is not None:
                    out.logprobs[request_id] = (chosen[i], ranks[i], top_ids[i][:n], top_values[i][:n])
        return out


class ModelRunner:
    def __init__(self, config: EngineConfig, source: loader.ModelSource, tp: TPGroup = SINGLE) -> None:
        self.config = config
        self.tp = tp
        self.in_step = False          # between broadcasting a step and its last collective
        self.workers = None           # on rank 0: the processes of ranks 1..N-1 (tp_workers.py)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and tp.size > 1:
            self.device = torch.device("cuda", tp.rank)
        self.dtype = getattr(torch, config.model.dtype)
        if self.device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
            _one_host_thread()
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len
        self.hf_config = config.model.hf_config
        torch.manual_seed(config.seed)
        self._allocated_before_load = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        self.model = self._load_model(source)
        attn = self.model.attention_layers()[0]
        self.shared_tile_size = attn.backend.shared_tile_seqs(attn.num_heads, attn.num_kv_heads)
        self.sampler = Sampler(self.hf_config.vocab_size, config.scheduler.eos_token_ids)
        self.input_batch = InputBatch(-(-self.max_model_len // self.block_size))
        self._prev_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._read_back: list[tuple[str, int, int]] = []   # rank 0 with TP: for the next broadcast
        self.graphs: CudaGraphs | None = None
        self.num_blocks = self._size_pool()
        self.capacity = memory.log_capacity(config.model, config.cache, self.num_blocks)
        self._allocate_pool()
        if self.device.type == "cuda" and not config.enforce_eager:
            sched = config.scheduler
            self.graphs = CudaGraphs(self.model, self.hf_config.hidden_size, self.dtype, self.device,
                                     sched.max_num_seqs, sched.max_num_batched_tokens, self.max_model_len,
                                     self.block_size, self.shared_tile_size)
            self.graphs.capture()
        if self.device.type == "cuda":
            self._warm_up_sampling()

    # ---- start-up -------------------------------------------------------------------------
    def _load_model(self, source: loader.ModelSource) -> torch.nn.Module:
        backend = select_backend(self.device.type, self.max_model_len)
        cls = model_class(self.hf_config)
        with _default_dtype(self.dtype), self.device:
            model = cls(self.hf_config, backend, self.max_model_len, self.tp)
        if self.config.model.load_format == "dummy":
            model.init_dummy_weights(self.config.seed)
        else:
            model.load_weights(loader.iter_weights(source, self.hf_config))
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def _warm_up_sampling(self) -> None:
        """The LM head and the sampler run outside the graphs, on as many rows as a step samples.
        Run both once for every such count, so that cuBLAS's kernel for each shape is loaded and
        the fused sampler's variants compiled before serving, not in its first steps (the first
        nano run on the H200 took 0.12 s longer than the next ones). A sampling row takes the fused
        kernel; an all-greedy batch's argmax is one torch kernel for every shape."""
        num_rows = self.config.scheduler.max_num_seqs
        hidden = torch.zeros(num_rows, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        row = SamplingRow(SamplingParams(temperature=1.0), [], [], None)
        for n in range(1, num_rows + 1):
            self.sampler(self.model.compute_logits(hidden[:n]), [row] * n, self._prev_tokens)
        torch.cuda.synchronize(self.device)

    def _size_pool(self) -> int:
        cache, model_cfg = self.config.cache, self.config.model
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if self.device.type != "cuda":
            return memory.num_blocks_for_budget(model_cfg, cache, memory.cpu_pool_budget(cache))
        return self.tp.min_over_ranks(self._blocks_that_fit())   # every rank must hold the same blocks

    def _blocks_that_fit(self) -> int:
        cache, model_cfg = self.config.cache, self.config.model
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        weights = loaded - self._allocated_before_load
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - loaded
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        by_utilization = memory.gpu_kv_budget(total, cache.gpu_memory_utilization, weights + non_torch, peak)
        budget = memory.gpu_pool_budget(cache.kv_cache_memory, by_utilization, free - peak - memory.GiB // 2)
        logger.info("GPU memory: %s total, weights %s, activation peak %s, outside torch %s, KV budget %s",
                    memory.format_bytes(total), memory.format_bytes(weights), memory.format_bytes(peak),
                    memory.format_bytes(non_torch), memory.format_bytes(budget))
        if budget <= 0:
            raise ValueError("no GPU memory left for the KV cache: raise gpu_memory_utilization "
                             "or lower max_num_batched_tokens")
        return memory.num_blocks_for_budget(model_cfg, cache, budget)

    def _profile_run(self) -> None:
        """One step as large as the scheduler can produce, against a one-block dummy pool."""
        num_tokens = self.config.scheduler.max_num_batched_tokens
        num_seqs = max(1, min(self.config.scheduler.max_num_seqs, num_tokens))
        self._bind_pool(torch.zeros(self._pool_shape(1), dtype=self.dtype, device=self.device))
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        cu = np.concatenate([[0], np.cumsum(lens)]).tolist()
        max_blocks = -(-max(lens) // self.block_size)
        batch = _Batch(input_ids=np.zeros(num_tokens, np.int64),
                       positions=np.concatenate([np.arange(n) for n in lens]),
                       slot_mapping=np.full(num_tokens, -1, np.int64), cu_seqlens_q=cu, seq_lens=lens,
                       block_tables=np.zeros((num_seqs, max_blocks), np.int32), logits_indices=[c - 1 for c in cu[1:]])
        with torch.inference_mode():
            logits = self._execute(batch)
            torch.softmax(logits.float(), dim=-1).sort(dim=-1)
        del logits

    def _pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        model = self.config.model
        return (2, model.num_layers, num_blocks, self.block_size, model.kv_heads_per_rank, model.head_dim)

    def _allocate_pool(self) -> None:
        self.kv_pool = torch.zeros(self._pool_shape(self.num_blocks), dtype=self.dtype, device=self.device)
        self._bind_pool(self.kv_pool)

    def _bind_pool(self, pool: torch.Tensor) -> None:
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = pool[0, i], pool[1, i]

    def model_info(self) -> dict:
        """What the benchmarks and tests ask about the loaded model (plain values)."""
        return {"weight_bytes": memory.weight_bytes(self.model), "cuda_graphs": self.graphs is not None,
                "kv_pool_shape": list(self.kv_pool.shape), "dtype": self.config.model.dtype}

    # ---- per step ---------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput, requests: list[CachedRequestState]) -> tuple[_Batch, list[int]]:
        """Flatten the step into per-token arrays and per-sequence lists (the per-step host hot
        path: the loop gathers token ids, numpy computes positions and slots for every token at
        once); also returns the indices of the requests that sample."""
        input_ids, cu, seq_lens, logits_indices, sampling = [], [0], [], [], []
        pending_at, pending_rows, prompt_rows, prompt_spans = [], [], [], []
        total = 0
        for index, (request, n, start) in enumerate(zip(requests, out.num_scheduled_tokens, out.num_computed_tokens)):
            if n == 1:
                input_ids.append(request.token_at(start))
            else:
                input_ids.extend(request.tokens_in(start, start + n))
            total += n
            if input_ids[-1] == PLACEHOLDER:   # sampled by the step still in flight
                pending_at.append(total - 1)
                pending_rows.append(request.prev_row)
            cu.append(total)
            seq_lens.append(start + n)
            if start + n == request.num_tokens:
                logits_indices.append(total - 1)
                sampling.append(index)
            if request.sampling_params.prompt_logprobs is not None:
                scored = min(start + n, len(request.prompt_token_ids) - 1) - start
                if scored > 0:
                    prompt_spans.append((index, start, scored))
                    prompt_rows.extend(range(total - n, total - n + scored))
        tables = self.input_batch.block_table(requests)
        counts = np.diff(cu)
        seq = np.repeat(np.arange(len(requests)), counts)
        positions = np.arange(total, dtype=np.int64) + np.repeat(np.asarray(seq_lens) - counts - cu[:-1], counts)
        bs = self.block_size
        slots = tables[seq, positions // bs].astype(np.int64) * bs + positions % bs
        return _Batch(np.array(input_ids, dtype=np.int64), positions, slots, cu, seq_lens, tables, logits_indices,
                      prompt_rows=prompt_rows, prompt_spans=prompt_spans, pending_at=pending_at,
                      pending_rows=pending_rows), sampling

    def _tensors(self, b: _Batch, tables: np.ndarray, single_lens: np.ndarray | None,
                 plan: SharedPrefixPlan | None):
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=to_device(b.slot_mapping, torch.int64, dev),
            cu_seqlens_q=to_device(b.cu_seqlens_q, torch.int32, dev),
            seq_lens=to_device(b.seq_lens, torch.int32, dev),
            block_tables=to_device(tables, torch.int32, dev),
            max_query_len=max(b.cu_seqlens_q[i + 1] - b.cu_seqlens_q[i] for i in range(len(b.seq_lens))),
            max_seq_len=max(b.seq_lens),
            shared=None if plan is None else SharedPrefixes(*(to_device(a, torch.int32, dev) for a in (
                plan.shared_lens, plan.tile_seqs, plan.tile_lens))),
            single_token_lens=None if single_lens is None else to_device(single_lens, torch.int32, dev),
        )
        input_ids = to_device(b.input_ids, torch.int64, dev)
        self._fill_pending(input_ids, b)
        positions = to_device(b.positions, torch.int64, dev)
        return input_ids, positions, md

    def _fill_pending(self, input_ids: torch.Tensor, b: _Batch) -> None:
        """Placeholders take the previous step's sampled tokens, device to device: one copy when
        token i takes sample i (decode steps of an unchanged batch), else one gather."""
        n = len(b.pending_at)
        if not n:
            return
        if _is_range(b.pending_at) and _is_range(b.pending_rows):
            input_ids[:n].copy_(self._prev_tokens[:n])
            return
        at, rows = to_device(np.array([b.pending_at, b.pending_rows]), torch.int64, self.device)
        input_ids[at] = self._prev_tokens[rows]

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> PendingStep:
        """Issue one step to the device without waiting for it: sampled tokens stay on the device
        for the next step's inputs and are copied to the host in the background. With a request
        under a grammar among those that sample, the sampling waits for PendingStep.sample()."""
        requests = self.input_batch.apply(out)
        batch, sampling_index = self._prepare(out, requests)
        self.in_step = True
        if self.tp.size > 1:
            self.tp.broadcast_object((out, self._read_back))
            self._read_back = []
        logits = self._execute(batch)
        sampling = [requests[i] for i in sampling_index]
        pending = PendingStep(sampling, self._prompt_logprobs(
            requests, batch, logits[len(sampling):] if batch.prompt_rows else None),
            self._note_read_back if self.tp.size > 1 else None)
        if any(r.sampling_params.structured_outputs is not None for r in sampling):
            pending._sample = lambda bitmask, rows: self._sample(pending, logits, bitmask, rows)
        else:
            self._sample(pending, logits, None, [])
        return pending

    @torch.inference_mode()
    def _sample(self, pending: PendingStep, logits: torch.Tensor | None, bitmask: torch.Tensor | None,
                rows: list[int]) -> None:
        sampling = pending.sampling
        if sampling:
            logits = logits[:len(sampling)]
            if rows:
                apply_grammar_bitmask(logits, bitmask, rows)
            sampling_rows = [self._sampling_row(request) for request in sampling]
            sample = self.sampler(logits, sampling_rows, self._prev_tokens)
            self._prev_tokens = self.tp.broadcast(sample.token_ids)   # the other ranks' next inputs
            pending.indices = _append_placeholders(sampling)
            pending.tokens = _to_host(sample.token_ids)
            if sample.logprobs is not None:
                pending.logprobs = ([r.params.logprobs for r in sampling_rows], [_to_host(t) for t in sample.logprobs])
        self.in_step = False
        if self.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()

    def _note_read_back(self, requests: list[CachedRequestState], indices: list[int], tokens: list[int]) -> None:
        """Rank 0: sampled values just written over placeholders, for the other ranks' copies. Only
        for requests still current: one re-sent (preempted) or dropped since has a new copy, or none."""
        current = self.input_batch.requests
        self._read_back.extend((r.request_id, i, t) for r, i, t in zip(requests, indices, tokens)
                               if current.get(r.request_id) is r)

    @torch.inference_mode()
    def run_worker_step(self, out: SchedulerOutput, read_back: list[tuple[str, int, int]]) -> None:
        """A rank other than 0 runs rank 0's step. Its requests take the values rank 0 read back
        before this step's diff (rank 0 wrote them before applying it), so both flatten the same
        batch; the same forward and logits follow (their collectives pair with rank 0's), then
        rank 0's sampled tokens become this rank's next inputs, placeholders here as there."""
        known = self.input_batch.requests
        for request_id, index, token in read_back:
            known[request_id].output_token_ids[index] = token
        requests = self.input_batch.apply(out)
        batch, sampling_index = self._prepare(out, requests)
        self._execute(batch)
        if sampling_index:
            tokens = torch.empty(len(sampling_index), dtype=torch.int64, device=self.device)
            self._prev_tokens = self.tp.broadcast(tokens)
            _append_placeholders([requests[i] for i in sampling_index])

    def shutdown(self) -> None:
        """Tell the other ranks to stop (they wait for the next step's batch), unless a step was
        interrupted halfway and they wait inside a collective instead."""
        if self.tp.size > 1 and not self.in_step:
            self.tp.broadcast_object(None)

    def _execute(self, batch: _Batch) -> torch.Tensor | None:
        """Forward, then the logits of the rows to sample followed by the prompt-logprob rows."""
        hidden = self._forward(batch)
        rows = batch.logits_indices + batch.prompt_rows
        if not rows:
            return None
        if _is_range(rows):   # decode steps: every token samples, no index to send
            return self.model.compute_logits(hidden[:len(rows)])
        return self.model.compute_logits(hidden[to_device(rows, torch.int64, self.device)])

    def _forward(self, batch: _Batch) -> torch.Tensor:
        tables = batch.block_tables
        single_lens, plan = self._cascade(batch, tables)
        if self.graphs is not None and self.graphs.covers(len(batch.input_ids), len(batch.seq_lens)):
            return self.graphs.run(batch, tables, single_lens, plan, self._fill_pending)
        return self.model(*self._tensors(batch, tables, single_lens, plan))

    def _cascade(self, batch: _Batch, tables: np.ndarray) -> tuple[np.ndarray | None, SharedPrefixPlan | None]:
        """Where the backend takes them (Triton): in a mixed step, the lengths of the single-token
        sequences (they go through the decode kernels); in any step, the cascade plan over those."""
        if not self.shared_tile_size:
            return None, None
        lens = np.asarray(batch.seq_lens, dtype=np.int32)
        single_lens = None
        if len(batch.input_ids) != len(batch.seq_lens):
            single_lens = np.where(np.diff(batch.cu_seqlens_q) == 1, lens, 0).astype(np.int32)
            lens = single_lens
        return single_lens, plan_shared_prefixes(tables, lens, self.block_size, self.shared_tile_size)

    def _sampling_row(self, request: CachedRequestState) -> SamplingRow:
        params = request.sampling_params
        if params.seed is not None and not params.greedy and request.generator is None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        pending = request.prev_row if request.has_pending_token else None
        return SamplingRow(params, request.prompt_token_ids, request.output_token_ids,
                           request.generator if not params.greedy else None, pending)

    def _prompt_logprobs(self, requests: list[CachedRequestState], batch: _Batch, logits: torch.Tensor | None) -> dict:
        result = {}
        offset = 0
        for index, start, count in batch.prompt_spans:
            request = requests[index]
            next_tokens = to_device(request.prompt_token_ids[start + 1:start + count + 1], torch.int64, self.device)
            result[request.request_id] = (start, prompt_logprobs(
                logits[offset:offset + count], next_tokens, request.sampling_params.prompt_logprobs))
            offset += count
        return result
