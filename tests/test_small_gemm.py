"""The small-batch GEMM (kernels/triton/small_gemm.py: decode steps of 2 to MAX_ROWS rows) against
torch's matmul in fp32, plain and with SiLU-and-mul fused into its input. Without CUDA it runs under
the Triton interpreter on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.triton import small_gemm
from tests.triton_interpreter import interpret, patch_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup_module():
    patch_interpreter()      # its tl.dot multiplies bfloat16 bits otherwise
    interpret(small_gemm, "_small_gemm_kernel")


def inputs(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m * n + k)
    return torch.randn(m, k, generator=gen).to(torch.bfloat16), torch.randn(n, k, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("m, n, k, block_k", [(2, 48, 64, 64), (20, 100, 300, 64), (70, 40, 96, 32),
                                              (17, 16, 128, 128)])
def test_equals_fp32_matmul(m, n, k, block_k):
    """Partial tiles of rows, of outputs and of K, more than one tile of rows (70 > 64)."""
    x, w = inputs(m, n, k)
    got = small_gemm.small_linear(x.to(DEVICE), w.to(DEVICE), BLOCK_K=block_k).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=1e-2, atol=1e-2 * k ** 0.5)


@pytest.mark.parametrize("m, n, k", [(3, 40, 96), (33, 24, 80)])
def test_silu_and_mul_epilogue_equals_the_unfused_ops(m, n, k):
    """w = [gate | up] rows: silu(x @ gate.T) * (x @ up.T), each product rounded to bf16 first as
    F.linear stores it; up rows start N rows in, whatever the tile (n = 40 is not a multiple of 16)."""
    x, w = inputs(m, 2 * n, k)
    gate, up = (x.float() @ w.float().T).to(torch.bfloat16).float().chunk(2, dim=-1)
    got = small_gemm.small_linear(x.to(DEVICE), w.to(DEVICE), silu_and_mul=True, BLOCK_K=32).cpu()
    assert got.shape == (m, n)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, rtol=2e-2, atol=1e-2 * k ** 0.5)


def test_rows_do_not_depend_on_the_batch():
    """A row's result is the same alone with one other row as among 40 (graph buckets pad batches)."""
    x, w = inputs(40, 32, 64)
    few = small_gemm.small_linear(x[:2].to(DEVICE), w.to(DEVICE), BLOCK_K=32).cpu()
    many = small_gemm.small_linear(x.to(DEVICE), w.to(DEVICE), BLOCK_K=32).cpu()
    assert torch.equal(few, many[:2])


@pytest.mark.parametrize("m, n, k, silu", [(2, 1024, 2048, False), (64, 6144, 1024, False),
                                           (16, 12288, 4096, True), (48, 4096, 12288, False)])
def test_config_fits_shared_memory_and_the_batch(m, n, k, silu):
    cfg = small_gemm.config(m, n, k, silu)
    assert 16 <= cfg["BLOCK_M"] <= max(16, m) * 2 and cfg["BLOCK_N"] >= 16 and cfg["num_stages"] >= 2
    stage = small_gemm.stage_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], silu)
    assert stage * (cfg["num_stages"] + 1) <= small_gemm.SHARED_MEMORY


def test_linear_falls_back_to_torch_with_the_activation_where_asked():
    """Off the GPU linear() is F.linear; activate applies SiLU-and-mul to its output, gated to its input."""
    from pagedllm.layers.linear import activation_in_gate_up, linear
    x, w = inputs(3, 8, 16)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    assert torch.equal(linear(x, w, activate=True), F.silu(gate) * up)
    x_gated = torch.cat([x, x], dim=1)
    assert torch.equal(linear(x_gated, w, gated=True), F.linear(F.silu(x) * x, w))
    assert not activation_in_gate_up(x, w)
