"""Triton GPU kernels: same layouts and semantics as pagedllm.kernels.torch_ref (see its docstring)."""
