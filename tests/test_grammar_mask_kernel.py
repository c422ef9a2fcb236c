"""The grammar-mask kernel (kernels/triton/grammar_mask.py) against the torch unpacking the sampler
uses off CUDA. Without CUDA it runs under the Triton interpreter on CPU tensors."""

import pytest
import torch

from pagedllm.kernels.triton import grammar_mask
from pagedllm.worker.sampler import apply_grammar_bitmask
from tests.triton_interpreter import interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup_module():
    interpret(grammar_mask, "_mask_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, mask_vocab", [(70, 70), (5000, 5000), (5000, 4100), (100, 200)])
def test_kernel_equals_torch_unpacking(dtype, vocab, mask_vocab):
    """A partial last word, two programs per row, a bitmask narrower than the logits (a model's
    vocabulary padded past its tokenizer's: the rest is forbidden) and one wider."""
    gen = torch.Generator().manual_seed(vocab + mask_vocab)
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    words = -(-mask_vocab // 32)
    bitmask = torch.randint(-2 ** 31, 2 ** 31, (5, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1                               # a row that allows everything
    rows = [0, 1, 3]                              # rows 2 and 4 are not constrained
    expected = logits.clone()
    apply_grammar_bitmask(expected, bitmask, rows)   # the torch path, on the CPU
    got = logits.to(DEVICE)
    grammar_mask.apply_bitmask(got, bitmask.to(DEVICE), torch.tensor(rows, device=DEVICE))
    assert torch.equal(got.cpu(), expected)
    allowed = (bitmask[0, 0] >> torch.arange(32, dtype=torch.int32)) & 1
    assert torch.isinf(expected[0, :32][allowed == 0]).all() and not torch.isinf(expected[0, :32][allowed == 1]).any()
    assert torch.equal(expected[[2, 4]], logits[[2, 4]])
    assert torch.isinf(expected[1, words * 32:]).all() and not torch.isinf(expected[1, :min(vocab, words * 32)]).any()
