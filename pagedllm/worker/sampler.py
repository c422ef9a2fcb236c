"""Turns the batch's last-position logits into next tokens, vectorised over the batch.

Order, as in vLLM: logit_bias, min_tokens (EOS/stop ids masked), penalties, then greedy argmax or
temperature -> top-k -> top-p -> min-p -> a draw. The draw uses the exponential race
(argmax p / q, q ~ Exp(1)), so seeded rows only need their own q from their own generator and the
result does not depend on which other requests share the batch. On CUDA, a batch with no
truncation and no seeded sampling row is drawn by one fused Triton kernel instead (Gumbel-max, the
same distribution, one read of the logits in their own dtype). Logprobs are those of the raw
model distribution (vLLM's default), top-N plus the sampled token with its rank.
"""

from dataclasses import dataclass

import torch

from pagedllm.core_types import PLACEHOLDER
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.transfer import to_device


@dataclass
class SamplingRow:
    """What the sampler needs of one request this step."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    pending_row: int | None = None   # row of prev_tokens holding this row's PLACEHOLDER value


@dataclass
class SampleResult:
    """Device tensors: nothing here forces the host to wait for the step."""
    token_ids: torch.Tensor                         # [R] int64
    # (sampled logprob [R], its rank [R], top ids [R, K], top logprobs [R, K]); K = largest request
    logprobs: tuple[torch.Tensor, ...] | None


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], prev_tokens: torch.Tensor) -> SampleResult:
        """prev_tokens: the previous step's samples, which fill the PLACEHOLDER that a row's
        output_token_ids may end with (its value is not on the host yet). The logits stay in their
        own dtype unless a bias, mask or penalty applies: upcasting is a pass over the whole batch."""
        raw = logits
        logits = self._apply_logit_bias(logits, rows)
        logits = self._apply_min_tokens(logits, rows)
        logits = self._apply_penalties(logits, rows, prev_tokens)
        tokens = self._sample(logits, rows)
        logprobs = None
        k = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
        if k is not None:
            logprobs = token_logprobs(raw, tokens, k)
        return SampleResult(tokens, logprobs)

    def _apply_logit_bias(self, logits, rows):
        entries = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items()]
        if not entries:
            return logits
        logits = logits.to(torch.float32, copy=True)
        index = to_device([[i, t] for i, t, _ in entries], torch.int64, logits.device)
        bias = to_device([b for _, _, b in entries], logits.dtype, logits.device)
        logits.index_put_((index[:, 0], index[:, 1]), bias, accumulate=True)
        return logits

    def _apply_min_tokens(self, logits, rows):
        masked = [(i, t) for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                  for t in set(self.eos_token_ids) | set(r.params.stop_token_ids) if t < logits.shape[1]]
        if not masked:
            return logits
        logits = logits.to(torch.float32, copy=True)
        index = to_device(masked, torch.int64, logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")
        return logits

    def _apply_penalties(self, logits, rows, prev_tokens):
        if not any(r.params.has_penalties for r in rows):
            return logits
        logits = logits.float()
        device = logits.device
        batch, vocab = logits.shape
        output_counts = torch.zeros(batch, vocab, device=device)
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            known = [t for t in r.output_token_ids if t != PLACEHOLDER]
            if known:
                out = to_device(known, torch.int64, device)
                output_counts[i].index_add_(0, out, torch.ones(len(out), device=device))
            if r.pending_row is not None:
                output_counts[i, prev_tokens[r.pending_row]] += 1
            if r.params.repetition_penalty != 1.0 and r.prompt_token_ids:
                seen[i, to_device(r.prompt_token_ids, torch.int64, device)] = True
        seen |= output_counts > 0
        rep = to_device([r.params.repetition_penalty for r in rows], torch.float32, device).unsqueeze(1)
        freq = to_device([r.params.frequency_penalty for r in rows], torch.float32, device).unsqueeze(1)
        pres = to_device([r.params.presence_penalty for r in rows], torch.float32, device).unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        return logits - freq * output_counts - pres * (output_counts > 0).float()

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_rows = [r.params.greedy for r in rows]
        if all(greedy_rows):
            return logits.argmax(dim=-1)
        if logits.is_cuda and all(_fusable(r) for r in rows):
            return _fused_sample(logits, rows)
        logits = logits.float()
        temperature = to_device([r.params.temperature if not r.params.greedy else 1.0 for r in rows],
                                torch.float32, logits.device).unsqueeze(1)
        scaled = logits / temperature
        scaled = self._truncate(scaled, rows)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                q[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        if not any(greedy_rows):
            return sampled   # no second pass over the vocabulary for an all-sampling batch
        greedy = to_device(greedy_rows, torch.bool, logits.device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _truncate(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """top-k, top-p and min-p: masked tokens get -inf."""
        device = logits.device
        vocab = logits.shape[1]
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        min_p = [r.params.min_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            k = to_device([k if 0 < k < vocab else vocab for k in top_k], torch.int64, device).unsqueeze(1)
            positions = torch.arange(vocab, device=device).unsqueeze(0)
            drop = positions >= k
            sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs   # mass of strictly better tokens
            drop |= before >= to_device(top_p, torch.float32, device).unsqueeze(1)
            logits = torch.full_like(logits, float("-inf")).scatter(
                1, order, sorted_logits.masked_fill(drop, float("-inf")))
        if any(p > 0.0 for p in min_p):
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * to_device(min_p, torch.float32, device).unsqueeze(1)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        return logits


def _fusable(row: SamplingRow) -> bool:
    """The fused kernel draws plain temperature samples from its own Philox stream: no truncation,
    and no per-request generator (a greedy row never uses its generator's draws)."""
    p = row.params
    return p.greedy or (row.generator is None and p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0)


def _fused_sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One kernel over the logits. The seed comes from torch's default CPU generator, so
    torch.manual_seed makes runs reproducible; it is drawn >= 2**32 so Triton compiles one variant.
    Triton is imported here, as by the attention backend: it is only installed where CUDA may be."""
    from pagedllm.kernels.triton.sampling import sample_tokens
    temperature = to_device([0.0 if r.params.greedy else r.params.temperature for r in rows],
                            torch.float32, logits.device)
    seed = torch.randint(2 ** 32, 2 ** 62, (1,)).item()
    return sample_tokens(logits, temperature, seed)


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Forbid, in place, the tokens that the grammars of `rows` do not allow next. `bitmask` is
    xgrammar's int32 [len(logits), words] layout (bit j of word w: token 32 w + j), on the host;
    tokens past its words (a model's vocabulary padded past its tokenizer's) are forbidden. On CUDA
    the whole mask and the row indices travel through pinned memory, nothing here waits for the
    device (a kernel that took its row indices from a pageable host list would stall the pipeline
    until the step's forward is done), and a Triton kernel writes the -inf in place
    (kernels/triton/grammar_mask.py); elsewhere torch ops unpack the bits."""
    device = logits.device
    if device.type == "cuda":
        from pagedllm.kernels.triton.grammar_mask import apply_bitmask
        apply_bitmask(logits, to_device(bitmask, torch.int32, device), to_device(rows, torch.int64, device))
        return
    every_row = len(rows) == len(logits)
    words = bitmask if every_row else bitmask[rows]
    bit = torch.arange(32, dtype=torch.int32, device=device)
    forbidden = ((words.unsqueeze(-1) >> bit) & 1 == 0).view(len(rows), -1)
    vocab = logits.shape[1]
    if forbidden.shape[1] < vocab:
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[1]), value=True)
    forbidden = forbidden[:, :vocab]
    if every_row:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.int64, device=device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> tuple[torch.Tensor, ...]:
    """Raw-distribution logprob and rank of `tokens` [R] under `logits` [R, V], and the top
    num_top ids and logprobs, as device tensors."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen.squeeze(1), ranks, top_ids, top_values


def prompt_logprobs(logits: torch.Tensor, next_tokens: torch.Tensor, num_top: int):
    """For positions with logits [P, V] and the actual next tokens [P]: (token logprob, rank, top ids,
    top logprobs) per position, as plain lists."""
    chosen, ranks, ids, values = (t.tolist() for t in token_logprobs(logits, next_tokens, num_top))
    return [(chosen[i], ranks[i], ids[i], values[i]) for i in range(len(chosen))]
