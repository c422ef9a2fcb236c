"""The SiLU-and-mul kernel (kernels/triton/silu_and_mul.py) against the torch ops it replaces. Without
CUDA it runs under the Triton interpreter on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.triton import silu_and_mul
from tests.triton_interpreter import interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup_module():
    global silu_and_mul
    silu_and_mul = interpret(silu_and_mul, "_silu_and_mul_kernel")


@pytest.mark.parametrize("tokens, width, row_stride", [(3, 1500, 3000), (2, 64, 200), (0, 128, 256)])
def test_equals_the_torch_ops(tokens, width, row_stride):
    """A width that is not a whole number of tiles (1500 = 1024 + 476), rows further apart than
    2 * width (a view into a wider buffer), and no rows at all."""
    gen = torch.Generator().manual_seed(width)
    buffer = (3 * torch.randn(tokens, row_stride, generator=gen)).to(torch.bfloat16)
    x = buffer[:, :2 * width]
    got = silu_and_mul.silu_and_mul(x.to(DEVICE)).cpu()
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert got.shape == (tokens, width) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    if DEVICE == "cuda" and tokens:   # the CPU interpreter rounds bf16 toward zero, torch to nearest
        assert (got == expected).float().mean().item() >= 0.99
