"""CUDA graphs for every step the scheduler produces: one replay instead of ~400 kernel launches
from Python, which on a slow host CPU took longer than the GPU's work (45-65 ms of host time for a
25 ms prefill step of 8192 tokens on the H100 machine).

Two families, captured at start-up into one memory pool, largest first so smaller graphs reuse
the larger ones' memory:
  decode  one query token per sequence; the batch is padded to a bucket of DECODE_BATCH_SIZES and
          attends through the split-K decode kernel.
  mixed   prefill chunks with or without decodes beside them; tokens are padded to a bucket of
          MIXED_TOKEN_SIZES and sequences to max_num_seqs, and attention goes through the unified
          kernel, whose grid depends only on those two padded sizes (padding sequences own no query
          rows, so their programs exit at once).
Padding tokens store nothing (slot -1) and their output rows are never read. Inputs are copied
into static buffers with one host-to-device transfer of every per-token and per-sequence list.
Decode graphs also take a cascade-attention plan (worker/shared_prefix.py) of up to MAX_TILES
tiles; unused tiles have length 0, and a step without a plan zeroes what the last one left.
"""

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

import numpy as np

from pagedllm.layers.attention import AttentionMetadata, SharedPrefixes
from pagedllm.worker.shared_prefix import MAX_TILES, SharedPrefixPlan
from pagedllm.worker.transfer import to_device

logger = logging.getLogger(__name__)

DECODE_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
# Finer steps at the top keep padding under ~20%. Steps larger than the last size run eagerly:
# with that many tokens the launches are a small part of the step.
MIXED_TOKEN_SIZES = [64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 8192,
                     10240, 12288, 14336, 16384]


def bucket_sizes(table: list[int], limit: int) -> list[int]:
    """The sizes of `table` below `limit`, then `limit` itself if the table reaches that far."""
    sizes = [s for s in table if s < limit]
    return sizes + [limit] if limit <= table[-1] else sizes


@dataclass
class _Static:
    """Input buffers the graphs read; each replay overwrites their leading rows."""
    input_ids: torch.Tensor      # [max tokens] int64
    positions: torch.Tensor      # [max tokens] int64
    slot_mapping: torch.Tensor   # [max tokens] int64
    seq_lens: torch.Tensor       # [max seqs] int32
    cu_decode: torch.Tensor      # [max seqs + 1] int32, 0..max seqs: one token per sequence
    cu_mixed: torch.Tensor       # [max seqs + 1] int32
    block_tables: torch.Tensor   # [max seqs, max blocks] int32
    hidden: torch.Tensor         # [max tokens, hidden] the graphs' output
    shared_lens: torch.Tensor    # [max seqs] int32, cascade plan of decode steps
    tile_seqs: torch.Tensor      # [MAX_TILES, tile size] int32
    tile_lens: torch.Tensor      # [MAX_TILES] int32


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 shared_tile_size: int = 0) -> None:
        """shared_tile_size: sequences per cascade tile (0: the backend takes no plan)."""
        self.model = model
        self.shared_tile_size = shared_tile_size
        self._plan_in_buffers = False
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.decode_sizes = bucket_sizes(DECODE_BATCH_SIZES, max_num_seqs)
        self.mixed_sizes = bucket_sizes(MIXED_TOKEN_SIZES, max_num_batched_tokens)
        tokens = max(self.decode_sizes + self.mixed_sizes)
        max_blocks = -(-max_model_len // block_size)
        self.static = _Static(
            input_ids=torch.zeros(tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(tokens, dtype=torch.int64, device=device),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            cu_decode=torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device),
            cu_mixed=torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device),
            hidden=torch.zeros(tokens, hidden_size, dtype=dtype, device=device),
            shared_lens=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            tile_seqs=torch.full((MAX_TILES, max(shared_tile_size, 1)), -1, dtype=torch.int32, device=device),
            tile_lens=torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
        self.decode: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed: dict[int, torch.cuda.CUDAGraph] = {}

    def __len__(self) -> int:
        return len(self.decode) + len(self.mixed)

    # ---- capture ----------------------------------------------------------------------------
    def model_args(self, kind: str, size: int) -> tuple:
        """The model's inputs for one bucket: views of the static buffers."""
        s = self.static
        if kind == "decode":
            shared = (SharedPrefixes(s.shared_lens[:size], s.tile_seqs, s.tile_lens)
                      if self.shared_tile_size else None)
            md = AttentionMetadata(s.slot_mapping[:size], s.cu_decode[:size + 1], s.seq_lens[:size],
                                   s.block_tables[:size], max_query_len=1, max_seq_len=self.max_model_len,
                                   shared=shared)
        else:
            md = AttentionMetadata(s.slot_mapping[:size], s.cu_mixed, s.seq_lens, s.block_tables,
                                   max_query_len=size, max_seq_len=self.max_model_len)
        return s.input_ids[:size], s.positions[:size], md

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, the largest first. Each is run once before its capture so that
        compilation (torch.compile, Triton) happens outside it. Inference mode as in the steps
        themselves: with autograd on, a forward keeps every layer's activations alive."""
        started = time.perf_counter()
        s = self.static
        work = sorted([(size, "mixed") for size in self.mixed_sizes] + [(size, "decode") for size in self.decode_sizes],
                      reverse=True)
        pool = None
        for size, kind in work:
            args = self.model_args(kind, size)
            s.hidden[:size] = self.model(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                s.hidden[:size] = self.model(*args)
            pool = graph.pool()
            (self.decode if kind == "decode" else self.mixed)[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batches up to %d, mixed steps up to %d tokens) in %.1f s",
                    len(self), max(self.decode_sizes), max(self.mixed_sizes, default=0),
                    time.perf_counter() - started)

    # ---- replay -----------------------------------------------------------------------------
    def _pick(self, num_tokens: int, num_seqs: int) -> tuple[str, int] | None:
        if num_tokens == num_seqs:
            sizes, kind, n = self.decode_sizes, "decode", num_seqs
        else:
            sizes, kind, n = self.mixed_sizes, "mixed", num_tokens
        size = next((s for s in sizes if s >= n), None)
        return None if size is None or num_seqs > self.max_num_seqs else (kind, size)

    def covers(self, num_tokens: int, num_seqs: int) -> bool:
        return self._pick(num_tokens, num_seqs) is not None

    def run(self, batch, block_tables, plan: SharedPrefixPlan | None, fill_pending: Callable) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, pad, replay; returns the hidden states of
        the step's real tokens. block_tables: the step's [B, blocks] int32 host array; plan: a
        decode step's cascade plan; fill_pending(input_ids, batch) writes the previous step's
        samples into placeholders."""
        num_tokens, num_seqs = len(batch.input_ids), len(batch.seq_lens)
        kind, size = self._pick(num_tokens, num_seqs)
        s = self.static
        packed = batch.input_ids + batch.positions + batch.slot_mapping + batch.seq_lens
        if kind == "mixed":
            packed = packed + batch.cu_seqlens_q
        parts = to_device(packed, torch.int64, s.input_ids.device).split(
            [num_tokens] * 3 + [num_seqs] + ([num_seqs + 1] if kind == "mixed" else []))
        s.input_ids[:num_tokens].copy_(parts[0])
        fill_pending(s.input_ids, batch)
        s.positions[:num_tokens].copy_(parts[1])
        s.slot_mapping[:num_tokens].copy_(parts[2])
        s.slot_mapping[num_tokens:size].fill_(-1)
        s.seq_lens[:num_seqs].copy_(parts[3])
        s.seq_lens[num_seqs:].fill_(0)
        if kind == "mixed":
            s.cu_mixed[:num_seqs + 1].copy_(parts[4])
            s.cu_mixed[num_seqs + 1:].fill_(num_tokens)
        tables = to_device(block_tables, torch.int32, s.block_tables.device)
        s.block_tables[:num_seqs, :tables.shape[1]].copy_(tables)
        if kind == "decode":
            self._set_plan(plan, num_seqs)
        (self.decode if kind == "decode" else self.mixed)[size].replay()
        return s.hidden[:num_tokens]

    def _set_plan(self, plan: SharedPrefixPlan | None, num_seqs: int) -> None:
        s = self.static
        if plan is None:
            if self._plan_in_buffers:
                s.shared_lens.zero_()
                s.tile_lens.zero_()
                self._plan_in_buffers = False
            return
        tiles = len(plan.tile_lens)
        packed = np.concatenate([plan.shared_lens, np.zeros(self.max_num_seqs - num_seqs, np.int32),
                                 plan.tile_lens, np.zeros(MAX_TILES - tiles, np.int32), plan.tile_seqs.ravel()])
        lens, tile_lens, tile_seqs = to_device(packed, torch.int32, s.shared_lens.device).split(
            [self.max_num_seqs, MAX_TILES, plan.tile_seqs.size])
        s.shared_lens.copy_(lens)
        s.tile_lens.copy_(tile_lens)
        s.tile_seqs[:tiles].copy_(tile_seqs.view(tiles, -1))
        self._plan_in_buffers = True
