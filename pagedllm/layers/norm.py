"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

import torch
from torch import nn

from pagedllm.kernels import triton_module
from pagedllm.layers.compile import fused_on_gpu


@fused_on_gpu
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fused_on_gpu
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return _rms_norm.__wrapped__(x, weight, eps), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x) * weight, or with a residual (norm(x + residual) * weight, x + residual). Rows of
    hidden states on a GPU take the Triton kernel; anything else the torch ops above."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return triton_module("rms_norm").rms_norm(x, weight, eps, residual)
    return _rms_norm(x, weight, eps) if residual is None else _add_rms_norm(x, residual, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With a residual: returns (norm(x + residual), x + residual), as the next layer needs both."""
        return rms_norm(x, self.weight, self.eps, residual)
