"""The MLP's activation: SiLU of the gate half times the up half, one fused kernel on GPU."""

import torch
import torch.nn.functional as F

from pagedllm.kernels import triton_module


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] = [gate | up] -> [..., I]. Rows of a GPU tensor take the Triton kernel."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return triton_module("silu_and_mul").silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
