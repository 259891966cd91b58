"""Draft tokens for speculative decoding, looked up in the request's own tokens (prompt lookup).

A reply often repeats what came before it: names, code, a JSON key, a sentence of the prompt.
When the last few tokens occurred earlier, the tokens that followed them then are a guess at
what follows now. The edge sends the guesses with the real token in one step; the core returns
a state for each row, and the edge keeps each guess its own sampler would have drawn anyway
(see `Engine._verify`). So the reply is the one plain decoding gives, only in fewer steps.

No model is needed: the lookup is an index of every n-gram (n = 1..max_n) to the end of its
latest occurrence, kept up to date as tokens are appended.
"""

from __future__ import annotations

MAX_NGRAM = 3  # the longest suffix looked up; longer matches first, down to one token


class NgramDrafter:
    """One generation's lookup table over its tokens so far (prompt, then reply)."""

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM):
        assert max_ngram >= 1
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest end, the last token's excluded
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self._index_last()
            self.tokens.append(token)

    def _index_last(self) -> None:
        """Index the n-grams ending at the current last token, which stops being the last."""
        end = len(self.tokens) - 1
        for n in range(1, min(self.max_ngram, end + 1) + 1):
            self._latest[tuple(self.tokens[end - n + 1 : end + 1])] = end

    def propose(self, k: int) -> list[int]:
        """`k` tokens that followed the latest earlier occurrence of the longest matching suffix, or none.

        A match p tokens back that runs into the end is read as a period p: the text repeats with it."""
        if k <= 0 or not self.tokens:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            end = self._latest.get(tuple(self.tokens[-n:]))
            if end is not None:
                seen, out = len(self.tokens), list[int]()
                for j in range(end + 1, end + 1 + k):
                    out.append(self.tokens[j] if j < seen else out[j - seen])
                return out
        return []


MAX_PAUSE = 16  # decode steps without drafts, at most, after drafts that were not kept


class DraftPacer:
    """How many drafts the next step carries: all that are allowed while some are kept; after a step whose
    drafts were all rejected, none for 1, 2, 4, ... up to MAX_PAUSE steps. Rejected drafts cost core rows
    (on a CPU a row of a batch is not free, and other streams share the batch); text that does not repeat
    itself soon stops paying for them, text that does keeps its drafts."""

    def __init__(self, limit: int):
        self.limit = limit
        self._pause = 0  # the length of the last pause
        self._waiting = 0  # steps left in the current pause

    def allowance(self) -> int:
        if self._waiting:
            self._waiting -= 1
            return 0
        return self.limit

    def record(self, sent: int, kept: int) -> None:
        if sent == 0:
            return
        if kept:
            self._pause = 0
        else:
            self._pause = min(max(1, 2 * self._pause), MAX_PAUSE)
            self._waiting = self._pause
