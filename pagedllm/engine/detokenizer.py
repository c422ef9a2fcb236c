"""Incremental detokenisation and stop-string detection for one sequence.

Decoding one token at a time is wrong for byte-level and sentencepiece tokenizers (a character can
span tokens, and spaces depend on the neighbour), so each step decodes a short window twice (with
and without the new tokens) and emits the difference, holding back text that ends in an incomplete
UTF-8 sequence (U+FFFD) until the next token completes it. The first of the two windows is
usually the previous token alone, whose text is the same in every request: it comes from a cache
shared by the engine's detokenizers, which halves the tokenizer calls.
"""

PROMPT_CONTEXT = 5  # prompt tokens decoded with the output so the first word gets its spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False,
                 token_text: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        # token id -> its text decoded alone (with this skip_special_tokens), shared across requests
        self.token_text = token_text if token_text is not None else {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_one(self, token_id: int) -> str:
        text = self.token_text.get(token_id)
        if text is None:
            text = self.token_text[token_id] = self._decode([token_id])
        return text

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string matched, if the text now contains one (the
        text is then cut at it)."""
        self.ids.append(token_id)
        if self.read_offset - self.prefix_offset == 1:
            prefix = self._decode_one(self.ids[self.prefix_offset])
        else:
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return self._check_stop(len(delta))

    def _check_stop(self, new_chars: int) -> str | None:
        if not self.stop:
            return None
        window_start = max(0, len(self.text) - new_chars - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            index = self.text.find(s, window_start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, s)
        if best is None:
            return None
        index, s = best
        self.text = self.text[:index + len(s)] if self.include_stop else self.text[:index]
        return s

    def stream_safe_length(self, finished: bool) -> int:
        """How much of the text may be sent now: text that could still become part of a stop
        string is held back until the request finishes."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - self.max_stop_len + 1)
