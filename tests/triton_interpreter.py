"""Two gaps of Triton 3.6's interpreter, patched for the tests that run kernels on CPU (the GPU
path is unaffected)."""

import importlib

import numpy as np
import torch
import triton
from triton.runtime import interpreter


def patch_interpreter() -> None:
    """Idempotent: each patch marks itself."""
    # 1. Scalars are 1-element arrays converted with int(), which NumPy >= 2.4 refuses
    #    (triton-lang/triton#9171), so loops with run-time bounds fail. Take the element instead.
    patch_tensor = interpreter._patch_lang_tensor
    if not getattr(patch_tensor, "_pagedllm_fix", False):
        def patched_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        patched_tensor._pagedllm_fix = True
        interpreter._patch_lang_tensor = patched_tensor
    # 2. bfloat16 is stored as uint16 and tl.dot multiplies the raw bits (triton-lang/triton#11584;
    #    bf16 is unsupported there). Widen bf16 operands to fp32 (exact) first.
    dot = interpreter.InterpreterBuilder.create_dot
    if not getattr(dot, "_pagedllm_fix", False):
        def widen(h):
            if h.dtype.scalar != triton.language.bfloat16:
                return h
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, triton.language.float32)

        def patched_dot(self, a, b, *args):
            return dot(self, widen(a), widen(b), *args)
        patched_dot._pagedllm_fix = True
        interpreter.InterpreterBuilder.create_dot = patched_dot



def interpret(module, kernel: str):
    """Without CUDA: make sure `module`'s kernels run under the interpreter (TRITON_INTERPRET is read
    when @triton.jit decorates, so a module imported before it was set is reloaded in place)."""
    if torch.cuda.is_available():
        return module
    triton.knobs.runtime.interpret = True
    if not isinstance(getattr(module, kernel), interpreter.InterpretedFunction):
        module = importlib.reload(module)
    assert isinstance(getattr(module, kernel), interpreter.InterpretedFunction)
    return module
