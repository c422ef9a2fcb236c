"""The skinny GEMM (kernels/triton/skinny_gemm.py: decode at batch 1) against torch's matmul in fp32,
plain and with SiLU-and-mul fused into its input. Without CUDA it runs under the Triton interpreter
on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.triton import skinny_gemm
from tests.triton_interpreter import interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup_module():
    interpret(skinny_gemm, "_skinny_kernel")


@pytest.mark.parametrize("n, k", [(48, 64), (200, 600), (37, 1030), (9, 2100)])
def test_equals_fp32_matmul(n, k):
    """Partial blocks of outputs and of K (k over BLOCK_K, not a multiple of it), both block widths."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    got = skinny_gemm.skinny_linear(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=1e-2, atol=1e-2 * k ** 0.5)


@pytest.mark.parametrize("n, k", [(40, 96), (33, 1100)])
def test_gated_equals_silu_and_mul_then_matmul(n, k):
    """x = [gate | up]: the kernel multiplies silu(gate) * up, rounded to bf16 as the unfused op stores it."""
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 2 * k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    gate, up = x.float().chunk(2, dim=-1)
    expected = (F.silu(gate) * up).to(torch.bfloat16).float() @ w.float().T
    got = skinny_gemm.skinny_linear(x.to(DEVICE), w.to(DEVICE), gated=True).cpu()
    assert got.shape == (1, n)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * k ** 0.5)


def test_block_widths():
    assert [skinny_gemm.block_n(k) for k in (1024, 2048, 4096, 12288)] == [4, 2, 2, 2]
