"""RMSNorm of each row, optionally of x + residual (returning that sum too, which the next layer
adds to): one program a row. Ours rather than a compiled torch function so that it can take part
in programmatic dependent launch (pdl.py) between the skinny GEMMs of a batch-1 decode step.

It launches with PDL up to small_gemm.MAX_ROWS rows, where our GEMMs stand on both sides (a kernel
launched after one without PDL cannot overlap it). With more rows cuBLAS GEMMs stand there, and
launching it with PDL made Qwen3-0.6B's nano workload ~8% slower on the H200 (3 runs of 4; not
understood), while the attention kernels' PDL after cuBLAS made no difference."""

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton import pdl
from pagedllm.kernels.triton.pdl import wait_for_inputs
from pagedllm.kernels.triton.small_gemm import MAX_ROWS


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, sum_out_ptr, eps, H, stride_x, stride_r,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """Rounded where torch rounds: the sum to x's dtype, the normalised row to x's dtype before
    the weight multiplies it in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(sum_out_ptr + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = w * (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (and residual) [T, H] with unit stride along H. Returns norm(x) * weight, or with a
    residual (norm(x + residual) * weight, x + residual); dtypes as torch's ops would give them."""
    tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,)
    out = torch.empty(tokens, hidden, dtype=torch.result_type(weight, x), device=x.device)
    if residual is None:
        residual, summed = x, out      # unread and unwritten without HAS_RESIDUAL
    else:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
        summed = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)   # rows contiguous, as written
    block = triton.next_power_of_2(hidden)
    if tokens > 0:
        _rms_norm_kernel[(tokens,)](x, residual, weight, out, summed, eps, hidden, x.stride(0), residual.stride(0),
                                    BLOCK=block, HAS_RESIDUAL=summed is not out,
                                    num_warps=min(16, max(1, block // 256)),
                                    **pdl.launch_options(x.device, wanted=tokens <= MAX_ROWS))
    return out if summed is out else (out, summed)
