"""torch.compile for the small elementwise stages of a layer (norms, rotary, activation) on GPU.

Each of these is a handful of tiny kernels in eager PyTorch; compiled, each becomes one fused
Triton kernel, which matters because a decode step launches every stage of every layer. On CPU the
eager version runs (no compiler needed, and CPU steps are dominated by the matmuls anyway).
"""

import functools

import torch

# One compiled function serves every layer, dtype and tensor rank it meets; allow the variants.
torch._dynamo.config.recompile_limit = 64


def fused_on_gpu(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(*args)

    return wrapper
