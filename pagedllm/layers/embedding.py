"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks.

Rank r holds rows [r * n, (r + 1) * n) of the table, n = ceil(vocab / tp) (the last rank's tail is
zero padding). The embedding looks up the ids it owns, zeros the rest and all-reduces; the LM head
computes its slice of the logits and all-gathers them, dropping the padding columns.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
        self.weight.weight_loader = self._load

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        owned = (local >= 0) & (local < self.rows)
        out = F.embedding(local.masked_fill(~owned, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~owned.unsqueeze(-1), 0))

    def _load(self, param: torch.Tensor, tensor: torch.Tensor, shard: int | None = None) -> None:
        assert shard is None and tensor.shape[0] == self.vocab_size and tensor.shape[1] == param.shape[1], \
            f"{tuple(tensor.shape)} vs vocab {self.vocab_size} x {param.shape[1]}"
        n = max(0, min(self.rows, self.vocab_size - self.start))
        param.data[:n].copy_(tensor[self.start:self.start + n])
        param.data[n:].zero_()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The table as LM head (its own, or the embedding's when tied): full-vocabulary logits on
        every rank."""
        local = F.linear(hidden, self.weight)
        return self.tp.all_gather_last_dim(local)[..., :self.vocab_size]

