"""CUDA graphs for every step the scheduler produces: one replay instead of ~400 kernel launches
from Python, which on a slow host CPU took longer than the GPU's work (45-65 ms of host time for a
25 ms prefill step of 8192 tokens on the H100 machine).

Three families, captured at start-up into one memory pool, largest first so smaller graphs reuse
the larger ones' memory:
  decode  one query token per sequence; the batch is padded to a bucket of DECODE_BATCH_SIZES and
          attends through the split-K decode kernel.
  shared  the same with a cascade-attention plan (worker/shared_prefix.py): sequences sharing a
          cached prefix read it once per tile. Captured only where the backend takes plans.
  mixed   prefill chunks with or without decodes beside them; tokens are padded to a bucket of
          MIXED_TOKEN_SIZES and sequences to max_num_seqs, and attention goes through the unified
          kernel, whose grid depends only on those two padded sizes (padding sequences own no query
          rows, so their programs exit at once). Where the backend takes plans, the single-token
          sequences go through the decode kernels with a plan instead (an empty one if none).
Padding tokens store nothing (slot -1) and their output rows are never read; unused plan tiles
have length 0. Inputs are copied into static buffers with one host-to-device transfer of every
per-token and per-sequence list and the block tables (two when there is a plan).
"""

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

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
    single_lens: torch.Tensor    # [max seqs] int32, mixed steps: seq_len of single-token sequences
    shared_lens: torch.Tensor    # [max seqs] int32, cascade plan
    tile_seqs: torch.Tensor      # [MAX_TILES, tile size] int32
    tile_lens: torch.Tensor      # [MAX_TILES] int32


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 shared_tile_size: int = 0) -> None:
        """shared_tile_size: sequences per cascade tile (0: the backend takes no plan)."""
        self.model = model
        self.shared_tile_size = shared_tile_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.decode_sizes = bucket_sizes(DECODE_BATCH_SIZES, max_num_seqs)
        self.mixed_sizes = bucket_sizes(MIXED_TOKEN_SIZES, max_num_batched_tokens)
        self.sizes = {"decode": self.decode_sizes, "shared": self.decode_sizes if shared_tile_size else [],
                      "mixed": self.mixed_sizes}
        tokens = max(self.decode_sizes + self.mixed_sizes)
        max_blocks = -(-max_model_len // block_size)
        seqs = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.static = _Static(
            input_ids=torch.zeros(tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(tokens, dtype=torch.int64, device=device),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
            seq_lens=seqs.clone(),
            cu_decode=torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device),
            cu_mixed=torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device),
            hidden=torch.zeros(tokens, hidden_size, dtype=dtype, device=device),
            single_lens=seqs.clone(),
            shared_lens=seqs.clone(),
            tile_seqs=torch.full((MAX_TILES, max(shared_tile_size, 1)), -1, dtype=torch.int32, device=device),
            tile_lens=torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
        self.graphs: dict[str, dict[int, torch.cuda.CUDAGraph]] = {kind: {} for kind in self.sizes}

    def __len__(self) -> int:
        return sum(len(graphs) for graphs in self.graphs.values())

    # ---- capture ----------------------------------------------------------------------------
    def model_args(self, kind: str, size: int) -> tuple:
        """The model's inputs for one bucket: views of the static buffers."""
        s = self.static
        if kind == "mixed":
            cascade = self.shared_tile_size > 0
            md = AttentionMetadata(s.slot_mapping[:size], s.cu_mixed, s.seq_lens, s.block_tables,
                                   max_query_len=size, max_seq_len=self.max_model_len,
                                   shared=SharedPrefixes(s.shared_lens, s.tile_seqs, s.tile_lens) if cascade else None,
                                   single_token_lens=s.single_lens if cascade else None)
        else:
            shared = SharedPrefixes(s.shared_lens[:size], s.tile_seqs, s.tile_lens) if kind == "shared" else None
            md = AttentionMetadata(s.slot_mapping[:size], s.cu_decode[:size + 1], s.seq_lens[:size],
                                   s.block_tables[:size], max_query_len=1, max_seq_len=self.max_model_len,
                                   shared=shared)
        return s.input_ids[:size], s.positions[:size], md

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, the largest first, then replay each once. Each is run once before
        its capture so that compilation (torch.compile, Triton) happens outside it. The replays read
        the static buffers as captured (padding only: slot -1 stores nothing). Inference mode as in the steps
        themselves: with autograd on, a forward keeps every layer's activations alive."""
        started = time.perf_counter()
        s = self.static
        work = sorted(((size, kind) for kind, sizes in self.sizes.items() for size in sizes), reverse=True)
        pool = None
        for size, kind in work:
            args = self.model_args(kind, size)
            s.hidden[:size] = self.model(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                s.hidden[:size] = self.model(*args)
            pool = graph.pool()
            self.graphs[kind][size] = graph
        for graphs in self.graphs.values():   # a graph's first replay uploads it to the device (slow):
            for graph in graphs.values():     # here, not in the first step that needs its size
                graph.replay()
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batches up to %d, mixed steps up to %d tokens) in %.1f s",
                    len(self), max(self.decode_sizes), max(self.mixed_sizes, default=0),
                    time.perf_counter() - started)

    # ---- replay -----------------------------------------------------------------------------
    def _pick(self, num_tokens: int, num_seqs: int, has_plan: bool = False) -> tuple[str, int] | None:
        if num_tokens == num_seqs:
            kind, n = ("shared" if has_plan else "decode"), num_seqs
        else:
            kind, n = "mixed", num_tokens
        size = next((s for s in self.sizes[kind] if s >= n), None)
        return None if size is None or num_seqs > self.max_num_seqs else (kind, size)

    def covers(self, num_tokens: int, num_seqs: int) -> bool:
        return self._pick(num_tokens, num_seqs) is not None

    def run(self, batch, block_tables: np.ndarray, single_lens: np.ndarray | None, plan: SharedPrefixPlan | None,
            fill_pending: Callable) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, pad, replay; returns the hidden states of
        the step's real tokens. block_tables: the step's [B, blocks] int32 host array; single_lens
        (mixed steps) and plan: as the runner gives them to AttentionMetadata; fill_pending(input_ids,
        batch) writes the previous step's samples into placeholders."""
        num_tokens, num_seqs = len(batch.input_ids), len(batch.seq_lens)
        kind, size = self._pick(num_tokens, num_seqs, plan is not None)
        s = self.static
        packed = [batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens, block_tables.ravel()]
        if kind == "mixed":
            packed.append(batch.cu_seqlens_q)
        parts = to_device(np.concatenate(packed), torch.int64, s.input_ids.device).split(
            [num_tokens] * 3 + [num_seqs, block_tables.size] + ([num_seqs + 1] if kind == "mixed" else []))
        s.input_ids[:num_tokens].copy_(parts[0])
        fill_pending(s.input_ids, batch)
        s.positions[:num_tokens].copy_(parts[1])
        s.slot_mapping[:num_tokens].copy_(parts[2])
        s.slot_mapping[num_tokens:size].fill_(-1)
        s.seq_lens[:num_seqs].copy_(parts[3])
        s.seq_lens[num_seqs:].fill_(0)
        s.block_tables[:num_seqs, :block_tables.shape[1]].copy_(parts[4].view(block_tables.shape))
        if kind == "mixed":
            s.cu_mixed[:num_seqs + 1].copy_(parts[5])
            s.cu_mixed[num_seqs + 1:].fill_(num_tokens)
        if kind == "shared" or (kind == "mixed" and self.shared_tile_size):
            self._set_cascade(single_lens, plan, num_seqs)
        self.graphs[kind][size].replay()
        return s.hidden[:num_tokens]

    def _set_cascade(self, single_lens: np.ndarray | None, plan: SharedPrefixPlan | None, num_seqs: int) -> None:
        """One transfer of the plan (or an empty one) and of a mixed step's single-token lengths."""
        s = self.static
        per_seq = np.zeros((2, self.max_num_seqs), np.int32)
        tile_lens = np.zeros(MAX_TILES, np.int32)
        tile_seqs = np.zeros((0, self.shared_tile_size), np.int32)
        if single_lens is not None:
            per_seq[0, :num_seqs] = single_lens
        if plan is not None:
            per_seq[1, :num_seqs] = plan.shared_lens
            tile_lens[:len(plan.tile_lens)] = plan.tile_lens
            tile_seqs = plan.tile_seqs
        packed = np.concatenate([per_seq.ravel(), tile_lens, tile_seqs.ravel()])
        singles, shared, lens, seqs = to_device(packed, torch.int32, s.seq_lens.device).split(
            [self.max_num_seqs, self.max_num_seqs, MAX_TILES, tile_seqs.size])
        s.single_lens.copy_(singles)
        s.shared_lens.copy_(shared)
        s.tile_lens.copy_(lens)
        s.tile_seqs[:len(tile_seqs)].copy_(seqs.view(tile_seqs.shape))
