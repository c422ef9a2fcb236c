"""Kernels: the torch reference ops (torch_ref.py) and the Triton kernels (triton/, GPU only)."""

import functools
import importlib


@functools.cache
def triton_module(name: str):
    """pagedllm.kernels.triton.<name>, imported on first use: Triton is there only where CUDA is."""
    return importlib.import_module(f"pagedllm.kernels.triton.{name}")
