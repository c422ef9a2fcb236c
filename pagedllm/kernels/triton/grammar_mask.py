"""Grammar token masks applied to the logits in place: -inf wherever a row's bitmask forbids a token.

Unpacking the bitmask with torch ops makes int32 temporaries 32 times its size (about 350 MB per
step at batch 256 and a 150k vocabulary) and several passes over them. Here each program reads its
slice of one row's words and writes only the forbidden logits: nothing is allocated, and the row
indices come from a device tensor, so one compiled kernel serves every batch. The bitmask comes
whole (one row per logits row, unconstrained rows unread): picking the constrained rows out on the
host would be a CPU gather of the whole mask on every step.
"""

import torch
import triton
import triton.language as tl

BLOCK = 4096   # tokens per program


@triton.jit
def _mask_kernel(logits_ptr, row_stride, bitmask_ptr, words_per_row, rows_ptr, vocab, BLOCK: tl.constexpr):
    """Program (i, chunk): row rows[i] of the logits, tokens [chunk * BLOCK, +BLOCK), under
    bitmask row rows[i] (bit j of word w allows token 32 w + j; tokens past its words are forbidden)."""
    row = tl.load(rows_ptr + tl.program_id(0))
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    words = tl.load(bitmask_ptr + row * words_per_row + cols // 32,
                    mask=inside & (cols // 32 < words_per_row), other=0)
    forbidden = ((words >> (cols % 32)) & 1) == 0
    target = logits_ptr + row * row_stride + cols
    tl.store(target, tl.full([BLOCK], float("-inf"), target.dtype.element_ty), mask=inside & forbidden)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [R, V] (rows contiguous), bitmask int32 [R, words] and rows int64 (the rows to mask),
    all on one device."""
    assert logits.stride(1) == 1 and bitmask.is_contiguous()
    assert bitmask.dtype == torch.int32 and rows.dtype == torch.int64
    vocab = logits.shape[1]
    if len(rows):
        _mask_kernel[(len(rows), triton.cdiv(vocab, BLOCK))](logits, logits.stride(0), bitmask, bitmask.shape[1],
                                                             rows, vocab, BLOCK=BLOCK)
