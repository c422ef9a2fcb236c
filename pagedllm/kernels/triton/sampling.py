"""Fused next-token draw: greedy argmax or a temperature-scaled sample in one pass over the logits.

The torch sampler spends a full pass over the [rows, vocab] logits per op (upcast, / T, softmax,
exponential noise, p / q, argmax): at batch 256 and a 150k vocabulary that is most of a millisecond
a step. Here each element is read once, in its stored dtype, and the draw is the Gumbel-max trick:
argmax(logits / T + G) with G = -log(-log U) is a sample of softmax(logits / T), the same
distribution as the exponential race the torch path uses. The random bits come from Philox inside
the kernel, keyed by one seed per call, so nothing but the logits and a temperature per row is read.

Rows with temperature 0 are greedy: plain argmax, ties to the lowest id as torch.argmax does.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
SERIES_BELOW = tl.constexpr(2.0 ** -10)   # -ln(1 - w) = w + w^2/2 + w^3/3 to 2^-32 relative below this


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """The hardware's approximate log2 (lg2.approx, absolute error ~2^-22) on the GPU: the accurate
    one took more than half the kernel's time at batch 256 on an H100. The interpreter has no
    libdevice, so it gets tl.log2."""
    if FAST:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _exponential2(bits, FAST: tl.constexpr):
    """An Exp(1) draw in base 2 (E / ln 2) from 32 random bits, exact in relative terms when small.

    Small E is what lets an unlikely token win (its noise -log E is large), and -log U loses it: U
    near 1 is where fp32 is coarsest (spacing 2^-24). On an H100, over 4M draws from a 150k vocabulary
    whose tail held 31% of the mass, tl.rand's U with an exact log2 under-sampled the tail by 28
    sigma (torch's exponential_ over-sampled it by 15 sigma in 2M). So draw W = 1 - U, which fp32
    holds finely near 0, and take -ln(1 - W) by its series where W is small: that measured within
    1.3 sigma everywhere. W rounds to 1 only for the top 2^-25 of bit patterns: E is then +inf and the
    token sits that draw out (noise -inf), never a NaN."""
    w = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10   # (bits + 1/2) / 2^32
    series = w * (1.0 + w * (0.5 + w * 0.3333333432674408)) * LOG2E
    return tl.where(w < SERIES_BELOW, series, -_log2(1.0 - w, FAST))


@triton.jit(do_not_specialize=["seed"])
def _sample_chunk_kernel(logits_ptr, row_stride, temperature_ptr, best_value_ptr, best_index_ptr, vocab, seed,
                         BLOCK: tl.constexpr, FAST_LOG2: tl.constexpr):
    """One program per (row, vocabulary chunk of BLOCK ids): the chunk's best (value, id)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < vocab,
                other=float("-inf")).to(tl.float32)
    temperature = tl.load(temperature_ptr + row)
    if temperature > 0.0:
        # Philox yields four words per counter: ids 4c..4c+3 of a row share counter c, each its own
        # word, so no two elements of a call share a draw whatever BLOCK is.
        counters = (row.to(tl.int64) * tl.cdiv(vocab, 4) + chunk * (BLOCK // 4)
                    + tl.arange(0, BLOCK // 4))
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
        # G = -log E with E ~ Exp(1). Base 2 throughout: log2 is one hardware instruction, and
        # argmax(x / T + G) is unchanged by scaling all by log2(e) (the shift it leaves is common).
        x = x * (LOG2E / temperature) - _log2(_exponential2(bits, FAST_LOG2), FAST_LOG2)
    best, index = tl.max(x, axis=0, return_indices=True)
    tl.store(best_value_ptr + row * num_chunks + chunk, best)
    tl.store(best_index_ptr + row * num_chunks + chunk, chunk * BLOCK + index)


@triton.jit
def _reduce_chunks_kernel(best_value_ptr, best_index_ptr, out_ptr, num_chunks, CHUNKS: tl.constexpr):
    """One program per row: the winner among its chunks (the first on ties, so the lowest id)."""
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS)
    mask = offs < num_chunks
    values = tl.load(best_value_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    _, winner = tl.max(values, axis=0, return_indices=True)
    index = tl.load(best_index_ptr + row * num_chunks + winner)
    tl.store(out_ptr + row, index.to(tl.int64))


def _config(rows: int) -> dict:
    """Tile width and warps for a batch of `rows`. Small batches get narrower chunks so there are
    still enough programs to fill the GPU."""
    return dict(block=1024, num_warps=4) if rows < 32 else dict(block=4096, num_warps=4)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """Token ids [R] int64 for logits [R, V] (any float dtype, rows may be strided) and per-row
    temperatures [R] float32 on the same device (0 = greedy). `seed` keys the Philox stream: the
    same seed and inputs give the same tokens. Keep seed >= 2**32 so that Triton always passes it as
    an int64 and one compiled kernel serves every call."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        _sample_launch(logits, temperatures, seed, out, **_config(logits.shape[0]))
    return out


def _sample_launch(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, out: torch.Tensor,
                   block: int, num_warps: int) -> None:
    """Both kernels with an explicit config (the benchmark sweeps configs through here)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert temperatures.shape == (rows,) and temperatures.dtype == torch.float32
    num_chunks = triton.cdiv(vocab, block)
    best_value = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _sample_chunk_kernel[(rows, num_chunks)](logits, logits.stride(0), temperatures, best_value, best_index,
                                             vocab, seed, BLOCK=block, FAST_LOG2=not triton.knobs.runtime.interpret,
                                             num_warps=num_warps)
    _reduce_chunks_kernel[(rows,)](best_value, best_index, out, num_chunks,
                                   CHUNKS=triton.next_power_of_2(num_chunks))
