"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel before it is still finishing, and waits for that kernel's writes only where it calls
gdc_wait(). A batch-1 decode step is ~250 kernels of a few microseconds each, so the gap and the
ramp-up between kernels are a large share of the step; with PDL the next kernel's programs are
resident and loading their weights by the time the previous one ends.

The contract every kernel here keeps when launched this way: before gdc_wait() it reads only
weights (nothing another kernel writes) and writes nothing; it calls gdc_wait() unconditionally,
so each kernel's completion still implies its predecessors'.
"""

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:     # an older Triton, without grid dependency control: kernels launch as before
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def enabled(device: torch.device) -> bool:
    """On CUDA devices of compute capability 9.0 or more, with a Triton that has it (never under
    the CPU interpreter, which has no grid dependency control)."""
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_options(device: torch.device, wanted: bool = True) -> dict:
    """A kernel's PDL constexpr, and the launch option where PDL is on (an older Triton knows no
    such option)."""
    return {"PDL": True, "launch_pdl": True} if wanted and enabled(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel launch (no-ops without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
