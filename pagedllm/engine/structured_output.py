"""Structured outputs with xgrammar: grammars from JSON schemas, regexes, choices and EBNF, and the
token masks that hold a request's output to its grammar.

The front end checks a request's grammar when it arrives (`grammar_of`, tokenizer-free, so a bad
schema is a 400 at once). The engine core compiles it against the tokenizer in a thread pool,
outside the step loop, with a cache keyed by (kind, spec); the request waits until its grammar is
ready without holding up the batch (the scheduler skips it). Each step the core advances every
constrained request's matcher by its new token, and fills one bitmask row per sampling request
(rows of unconstrained requests are not read) for the worker, which applies it to the logits on
their device before sampling; xgrammar does both without the GIL, the fill on its own threads.
The bitmask spans the tokenizer's vocabulary; model ids past it are never allowed. JSON (schemas
and json_object alike) is compact, without free whitespace: a loop of blank space cannot eat the
token budget. Compact JSON never holds a raw control character, so its rows also forbid every
token that decodes to one (xgrammar 0.2.9 lets them into strings with a maxLength, which strict
JSON parsers then refuse). xgrammar 0.2.9 also lets UTF-8-encoded surrogates (bytes ED A0-BF xx,
not UTF-8) into JSON strings, where it counts one character and a decoder writes three U+FFFD,
breaking a maxLength: JSON rows forbid tokens that hold such a prefix and, after a token ending in
a lone ED byte, tokens that start with A0-BF.
"""

import functools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
import torch

from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

CACHE_SIZE = 1024     # compiled grammars kept (each a few hundred KB at most)


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs need xgrammar, which is not installed: pip install xgrammar") from None
    return xgrammar


def grammar_of(params: StructuredOutputsParams):
    """The xgrammar Grammar of `params` (tokenizer-free). ValueError, with xgrammar's reason, when
    the schema, regex or grammar cannot be used."""
    return _grammar(*params.key)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _grammar(kind: str, spec: str):
    """(Cached: a front end checks the same schema for every request that carries it.)"""
    xgr = _xgr()
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c) for c in json.loads(spec))   # JSON escapes are EBNF's
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        message = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message)   # xgrammar's "[time] file.cc:line:"
        raise ValueError(f"the {kind} cannot be compiled: {message}") from None


def _bitmask_row(vocab_size: int, forbidden: list[int]) -> torch.Tensor:
    """An xgrammar bitmask row (int32 words, bit j of word w for token 32 w + j) allowing every
    token but `forbidden`."""
    allowed = torch.ones(-(-vocab_size // 32) * 32, dtype=torch.int64)
    allowed[forbidden] = 0
    words = (allowed.view(-1, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


class GrammarState:
    """One request's grammar: its compilation (a future), then its matcher."""
    __slots__ = ("future", "matcher", "is_json", "last_token")

    def __init__(self, future: Future, is_json: bool) -> None:
        self.future = future
        self.matcher = None
        self.is_json = is_json          # compact JSON: its rows also forbid control characters
        self.last_token = -1            # the last token its matcher accepted

    def ready(self) -> bool:
        """Compiled (or failed): the scheduler may admit the request."""
        return self.future.done()


class StructuredOutputManager:
    def __init__(self, load_tokenizer, pin_memory: bool = False, max_threads: int = 4) -> None:
        self._load_tokenizer = load_tokenizer
        self._pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="pagedllm-grammar")
        self._bitmask = None
        self._lock = threading.Lock()
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._batch = None
        self._failed: list = []         # requests whose compilation failed (appended by pool threads)
        self._json_guard = None         # a bitmask row without the tokens that hold control characters
                                        # or a surrogate's prefix (its width is every bitmask's: the
                                        # tokenizer's vocabulary)
        self._after_lone_ed = None      # a row without the tokens that start with a byte A0-BF
        self._ends_in_lone_ed: frozenset[int] = frozenset()
        self.num_requests = 0           # constrained sequences seen
        self.compile_time = 0.0         # seconds spent compiling grammars
        self.mask_time = 0.0            # seconds spent advancing matchers and filling bitmasks
        self._pool.submit(self._warm_up)

    def _warm_up(self) -> None:
        """Load the tokenizer and build the compiler in the background at start-up, so the first
        constrained request does not wait for them (a model without a tokenizer has none to load)."""
        try:
            self._compiler_for()
        except Exception:  # noqa: BLE001 - reported again to the first request that needs it
            logger.debug("no grammar compiler", exc_info=True)

    def add(self, request) -> None:
        """Start (or reuse) the compilation of the request's grammar."""
        key = request.sampling_params.structured_outputs.key
        with self._lock:
            future = self._compiled.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self._compile, request.sampling_params.structured_outputs)
                self._compiled[key] = future
                if len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
        request.grammar = GrammarState(future, is_json=key[0] in ("json", "json_object"))
        self.num_requests += 1
        future.add_done_callback(lambda f: f.exception() is not None and self._failed.append(request))

    def wait(self, timeout: float) -> None:
        """Block until a compilation finishes (or `timeout` s): when only requests whose grammar
        is compiling are left, the engine waits here instead of spinning."""
        with self._lock:
            compiling = [f for f in self._compiled.values() if not f.done()]
        if compiling:
            futures_wait(compiling, timeout, return_when=FIRST_COMPLETED)

    def take_failed(self) -> list:
        """Requests whose grammar failed to compile since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def _compile(self, params: StructuredOutputsParams):
        start = time.perf_counter()
        compiled = self._compiler_for().compile_grammar(grammar_of(params))
        with self._lock:
            self.compile_time += time.perf_counter() - start
        return compiled

    def _compiler_for(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                tokenizer = self._load_tokenizer()
                if tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer, and this model has none")
                # the tokenizer's own vocabulary, not the model's (often padded past it): the ids
                # beyond are never allowed, and xgrammar, which would count them as special
                # tokens, advanced a matcher 10x slower with 100k of them (a dummy Qwen3 under
                # SmolLM2's tokenizer)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer)
                self._compiler = xgr.GrammarCompiler(info)
                self._batch = xgr.BatchGrammarMatcher()
                self._set_guards(info.vocab_size, info.decoded_vocab)
            return self._compiler

    def _set_guards(self, vocab_size: int, vocab: list[bytes]) -> None:
        """The JSON rows' extra masks, from each token's bytes (module docstring)."""
        surrogate = re.compile(rb"\xed[\xa0-\xbf]")
        self._json_guard = _bitmask_row(vocab_size, [
            i for i, text in enumerate(vocab) if any(byte < 0x20 for byte in text) or surrogate.search(text)]).numpy()
        self._after_lone_ed = _bitmask_row(vocab_size, [
            i for i, text in enumerate(vocab) if text and 0xA0 <= text[0] <= 0xBF]).numpy()
        self._ends_in_lone_ed = frozenset(i for i, text in enumerate(vocab) if text.endswith(b"\xed"))

    def _matcher(self, request):
        state = request.grammar
        if state.matcher is None:
            state.matcher = _xgr().GrammarMatcher(state.future.result())
        return state.matcher

    # ---- the step's grammar work ---------------------------------------------------------------
    def accept(self, requests: list, tokens: list[int]) -> list[bool]:
        """Advance the requests' matchers by their new tokens, in one call; for each, False if its
        grammar forbids the token."""
        start = time.perf_counter()
        accepted = self._batch.batch_accept_token([self._matcher(r) for r in requests], tokens)
        for request, token in zip(requests, tokens):
            request.grammar.last_token = token
        self.mask_time += time.perf_counter() - start
        return accepted

    def terminated(self, request) -> bool:
        return self._matcher(request).is_terminated()

    def bitmask(self, requests: list) -> tuple[torch.Tensor, list[int]]:
        """One int32 bitmask row per request (as xgrammar lays them out) and the rows that constrain:
        rows of requests without a grammar, or whose grammar is complete, are not filled (nor read)."""
        start = time.perf_counter()
        bitmask = self._rows(len(requests))
        rows, matchers, json_rows = [], [], []
        for row, request in enumerate(requests):
            if request.grammar is None or request.is_finished:
                continue
            matcher = self._matcher(request)
            if not matcher.is_terminated():
                rows.append(row)
                matchers.append(matcher)
                if request.grammar.is_json:
                    json_rows.append(row)
        if matchers:   # (xgrammar's threads, without the GIL)
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        if json_rows:   # numpy: one thread (torch's parallel ops would wake its pool on every step)
            words = bitmask.numpy()
            if len(json_rows) == len(requests):
                np.bitwise_and(words, self._json_guard, out=words)
            else:
                words[json_rows] &= self._json_guard
            for row in json_rows:
                if requests[row].grammar.last_token in self._ends_in_lone_ed:
                    words[row] &= self._after_lone_ed
        self.mask_time += time.perf_counter() - start
        return bitmask, rows

    def _rows(self, n: int) -> torch.Tensor:
        """n rows of the reused bitmask buffer (pinned when the masks go to a GPU). Reuse is safe:
        the core fills a step's mask once the step before has returned its tokens, so that step's
        mask has been copied to the device."""
        if self._bitmask is None or len(self._bitmask) < n:
            self._bitmask = torch.empty(max(n, 256), len(self._json_guard), dtype=torch.int32,
                                        pin_memory=self._pin_memory)
        return self._bitmask[:n]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
