"""The skinny GEMM (kernels/triton/skinny_gemm.py: decode at batch 1-4) against torch's matmul in
fp32. Without CUDA it runs under the Triton interpreter on CPU tensors."""

import pytest
import torch

from pagedllm.kernels.triton import skinny_gemm
from tests.triton_interpreter import interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup_module():
    interpret(skinny_gemm, "_skinny_kernel")


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("n, k", [(48, 64), (200, 600), (37, 1030)])
def test_equals_fp32_matmul(m, n, k):
    """Partial blocks of outputs and of K (k over BLOCK_K, not a multiple of it), odd row counts."""
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    expected = x.float() @ w.float().T
    got = skinny_gemm.skinny_linear(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * k ** 0.5)


def test_strided_rows_and_block_widths():
    """x may be a view with a row stride (a slice of a larger batch); narrow N gets narrow blocks."""
    x = torch.randn(2, 8, 64).to(torch.bfloat16)[:, 0]
    w = torch.randn(16, 64).to(torch.bfloat16)
    got = skinny_gemm.skinny_linear(x.to(DEVICE), w.to(DEVICE)).cpu()
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=1e-2, atol=0.1)
    assert [skinny_gemm.block_n(n) for n in (1024, 4096, 6144, 151936)] == [4, 16, 16, 32]


def test_used_for_one_row_and_small_weights():
    """Where it was measured faster than cuBLAS: Qwen3-0.6B's layers at batch 1; not 8B's gate_up."""
    w = torch.empty(6144, 1024, dtype=torch.bfloat16, device="meta")
    assert skinny_gemm.worth_it(torch.empty(1, 1024, device="meta"), w)
    assert not skinny_gemm.worth_it(torch.empty(2, 1024, device="meta"), w)
    assert not skinny_gemm.worth_it(torch.empty(1, 4096, device="meta"),
                                    torch.empty(24576, 4096, dtype=torch.bfloat16, device="meta"))
