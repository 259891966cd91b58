"""Constrained decoding at the edge: a grammar masks the logits before each token is sampled.

The edge holds the logits and the tokenizer, so structured output and tool-call syntax are enforced
here and the core never learns a schema exists. llguidance (a maintained grammar engine) compiles JSON
schemas and Lark grammars against the tokenizer and gives the set of allowed next tokens each step.
A compiled grammar is cached by its text and copied per request, so a schema is compiled once.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from edge_proxy.compute import zeros
from veil.errors import InvalidRequest

# How JSON is laid out under a grammar: one space after ',' and ':', no other whitespace, so a small
# model cannot wander into endless whitespace and the text reads like OpenAI's.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# the engine's error messages name the grammar only; verbose ones would also carry the generated text
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
CACHE_SIZE = 256  # compiled grammars kept (each a few hundred kB at most)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON text valid under `schema`, laid out as JSON_LAYOUT."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)  # type: ignore[arg-type]


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict[str, Any]) -> str:
    """A `%json` rule body for a Lark grammar, with the same layout as json_schema_grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT}, separators=(",", ":"))


class Constraint:
    """One generation's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: frozenset[int]):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._eos_only = zeros(vocab_size, torch.bool)  # made on a request's worker thread (see edge_proxy.compute)
        self._eos_only[list(eos_ids)] = True

    @property
    def complete(self) -> bool:
        """The grammar has been matched and nothing may follow: the reply is over."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar admits next (EOS once it is satisfied)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(np.bool_))
        if allowed.shape[0] < self.vocab_size:  # the tokenizer knows fewer ids than the model's head has rows
            allowed = torch.cat([allowed, torch.zeros(self.vocab_size - allowed.shape[0], dtype=torch.bool)])
        # an engine error leaves no token allowed: end the reply rather than sample from nothing
        return allowed if bool(allowed.any()) else self._eos_only

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    """The model's tokenizer as the grammar engine sees it, and compiled grammars by their text (LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], capacity: int = CACHE_SIZE):
        self.tokenizer, self.vocab_size, self.eos_ids, self.capacity = tokenizer, vocab_size, eos_ids, capacity
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses), for tests and the bench

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:  # about 0.3 s for a 49k vocabulary: once, on first use
                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                        eos_token=sorted(self.eos_ids))
            return self._ll

    def token_bytes(self, token: int) -> bytes:
        return self.ll_tokenizer.decode_bytes([token])

    def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh matcher for `grammar`, compiled on first use; a grammar the engine refuses is a 400 on `param`."""
        tokenizer = self.ll_tokenizer
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(tokenizer, grammar, limits=_LIMITS)
            if compiled.is_error():
                reason = compiled.get_error().splitlines()[0][:300]
                raise InvalidRequest(f"'{param}' cannot be enforced: {reason}", param=param, code="invalid_value")
            with self._lock:
                self.compiled += 1
                self._compiled[grammar] = compiled
                while len(self._compiled) > self.capacity:
                    self._compiled.popitem(last=False)
        return Constraint(compiled.deep_copy(), self.vocab_size, self.eos_ids)
