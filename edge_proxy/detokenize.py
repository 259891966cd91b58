"""Streaming text out of token ids: never half a UTF-8 character, never a stop string."""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 4  # prompt tokens kept as context so leading spaces decode as in the full text


class IncrementalDetokenizer:
    """Yields only text that later tokens cannot change (a trailing U+FFFD means 'wait')."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back once generation ends, less a character cut off mid-way."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :].rstrip("\ufffd") if len(full) > len(prefix) else ""


class StopMatcher:
    """Holds back any tail that could begin a stop string, so a stop is never emitted in part.

    One Knuth-Morris-Pratt automaton per stop string: each character of the reply advances every automaton
    once (amortized), so the work is linear in the text whatever the stops are, and the automaton's state is
    exactly the longest held-back tail that is a prefix of its stop. The reply ends at the first stop string
    to be completed (the longest one if several end on the same character)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        base = len(self.pending)
        self.pending += text
        for j, ch in enumerate(text):
            done = 0
            for i, stop in enumerate(self.stops):
                k, fail = self._state[i], self._fail[i]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    done = max(done, k)
                    k = fail[k - 1]
                self._state[i] = k
            if done:
                out = self.pending[:base + j + 1 - done]
                self.pending, self._state = "", [0] * len(self.stops)
                return out, True
        cut = len(self.pending) - max(self._state)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending, self._state = self.pending, "", [0] * len(self.stops)
        return out


def _failure(s: str) -> list[int]:
    """KMP's failure function: fail[i] = the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail
