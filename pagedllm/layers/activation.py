"""The MLP's activation: SiLU of the gate half times the up half, one fused kernel on GPU."""

import torch
import torch.nn.functional as F

from pagedllm.layers.compile import fused_on_gpu


@fused_on_gpu
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] = [gate | up] -> [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
