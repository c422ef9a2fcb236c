"""Linear layers split across tensor-parallel ranks (Megatron style).

ColumnParallelLinear splits the output features: each rank computes its slice of y and keeps it
(q/k/v heads, gate/up rows), no communication. RowParallelLinear splits the input features: each
rank computes a partial y from its slice of x, then one all-reduce sums them (o_proj, down_proj).
A column layer followed by a row layer thus costs a single all-reduce.

Each parameter carries a `weight_loader(param, tensor, shard=None)` that copies this rank's piece
of a full checkpoint tensor; with one rank the piece is the whole tensor.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.kernels import triton_module
from pagedllm.layers.activation import silu_and_mul


@dataclass(frozen=True)
class Shard:
    """One logical projection fused into a column layer (q, k, v or gate, up). It is cut into
    `parts` equal pieces; rank r holds piece r * parts // tp, so with fewer pieces than ranks
    (fewer KV heads than GPUs) neighbouring ranks hold the same piece, replicated."""
    size: int
    parts: int

    @property
    def local_size(self) -> int:
        return self.size // self.parts

    def piece(self, rank: int, tp: int) -> int:
        return rank * self.parts // tp


TRITON_DTYPES = (torch.bfloat16, torch.float16)
SKINNY_MAX_WEIGHTS = 20 << 20   # elements: Qwen3-8B's o_proj (16.8 M) streams faster there, its qkv (25.2 M) not


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False, activate: bool = False, overlap: bool = True) -> torch.Tensor:
    """F.linear, except a decode step's few rows in half precision on a GPU, where our kernels stream
    the weights faster than cuBLAS's (_kernel). The MLP's SiLU-and-mul goes where
    activation_in_gate_up() says: gated, x is [gate | up] and the input is silu(gate) * up (the
    skinny kernel computes it as it loads x); activate, weight's rows are [gate | up] and the
    output is silu(gate) * up (the small-batch kernel's epilogue). overlap=False: our kernels launch
    without programmatic dependent launch, after the kernel before them has ended."""
    kernel = _kernel(x, weight, bias)
    if kernel == "skinny_gemm":
        assert not activate
        return triton_module(kernel).skinny_linear(x, weight, gated, overlap)
    if kernel == "small_gemm":
        return triton_module(kernel).small_linear(silu_and_mul(x) if gated else x, weight, silu_and_mul=activate,
                                                  overlap=overlap)
    y = F.linear(silu_and_mul(x) if gated else x, weight, bias)
    return silu_and_mul(y) if activate else y


def activation_in_gate_up(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether the MLP applies SiLU-and-mul in its gate/up projection's epilogue (activate=True)
    rather than on the down projection's input (gated=True): only the small-batch kernel has
    the epilogue, only the skinny kernel the fused input; otherwise it is one kernel either way."""
    return _kernel(x, gate_up, None) == "small_gemm"


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Which of our kernels takes x @ weight.T: one row of a matrix under SKINNY_MAX_WEIGHTS the
    skinny one (one-warp programs), up to small_gemm.MAX_ROWS rows the small-batch one (tensor-core
    tiles); None for cuBLAS (more rows, a bias, another dtype or device)."""
    if bias is not None or not x.is_cuda or x.dtype not in TRITON_DTYPES or x.dim() != 2 or x.stride(1) != 1:
        return None
    if x.shape[0] == 1 and x.is_contiguous() and weight.numel() < SKINNY_MAX_WEIGHTS:
        return "skinny_gemm"
    return "small_gemm" if x.shape[0] <= triton_module("small_gemm").MAX_ROWS else None


def copy_whole(param: torch.Tensor, tensor: torch.Tensor, shard: int | None = None) -> None:
    """The loader of replicated parameters (norms, and every parameter with one rank)."""
    assert shard is None and param.shape == tensor.shape, f"{tuple(tensor.shape)} vs {tuple(param.shape)}"
    param.data.copy_(tensor)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, shards: list[Shard], tp: TPGroup, bias: bool) -> None:
        super().__init__()
        for s in shards:
            assert s.size % s.parts == 0 and (s.parts % tp.size == 0 or tp.size % s.parts == 0), s
        self.tp = tp
        self.shards = shards
        self.shard_sizes = [s.local_size for s in shards]   # this rank's output slices, in order
        out = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.weight.weight_loader = self._load
        self.bias = nn.Parameter(torch.empty(out)) if bias else None
        if bias:
            self.bias.weight_loader = self._load

    def forward(self, x: torch.Tensor, activate: bool = False) -> torch.Tensor:
        """activate: the layer holds [gate | up] and returns silu(gate) * up (see linear())."""
        return linear(x, self.weight, self.bias, activate=activate)

    def _load(self, param: torch.Tensor, tensor: torch.Tensor, shard: int | None = None) -> None:
        """`shard` names one logical projection (a checkpoint's q_proj); None means all of them
        concatenated (our own fused layout)."""
        if shard is None:
            full = [s.size for s in self.shards]
            assert tensor.shape[0] == sum(full), f"{tuple(tensor.shape)} vs fused rows {full}"
            for i, part in enumerate(tensor.split(full)):
                self._load(param, part, i)
            return
        s = self.shards[shard]
        assert tensor.shape[0] == s.size and tensor.shape[1:] == param.shape[1:], \
            f"{tuple(tensor.shape)} vs shard of {s.size} rows x {tuple(param.shape[1:])}"
        start = sum(self.shard_sizes[:shard])
        piece = tensor.narrow(0, s.piece(self.tp.rank, self.tp.size) * s.local_size, s.local_size)
        param.data[start:start + s.local_size].copy_(piece)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool) -> None:
        super().__init__()
        assert in_features % tp.size == 0, (in_features, tp.size)
        self.tp = tp
        self.local_in = in_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))
        self.weight.weight_loader = self._load
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if bias:
            self.bias.weight_loader = copy_whole

    def forward(self, x: torch.Tensor, gated: bool = False, overlap: bool = True) -> torch.Tensor:
        """gated: x is [gate | up] of this rank's features, as the MLP's down projection gets it.
        overlap: as linear() takes it."""
        y = self.tp.all_reduce(linear(x, self.weight, gated=gated, overlap=overlap))
        return y if self.bias is None else y + self.bias   # the bias once, after the sum

    def _load(self, param: torch.Tensor, tensor: torch.Tensor, shard: int | None = None) -> None:
        assert shard is None and tensor.shape[0] == param.shape[0], f"{tuple(tensor.shape)} vs {tuple(param.shape)}"
        param.data.copy_(tensor.narrow(1, self.tp.rank * self.local_in, self.local_in))
