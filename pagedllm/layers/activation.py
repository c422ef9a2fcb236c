"""The MLP's activation: SiLU of the gate half times the up half, one fused kernel on GPU."""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _triton_silu_and_mul():
    """The kernel's module, imported once (Triton is there only where CUDA is)."""
    from pagedllm.kernels.triton import silu_and_mul
    return silu_and_mul


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] = [gate | up] -> [..., I]. Rows of a GPU tensor take the Triton kernel."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return _triton_silu_and_mul().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
