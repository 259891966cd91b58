"""Text as guardrails compare it: NFKC-normalized, invisible format characters removed, with a map back.

A rule for `password` must also stop `ｐａｓｓｗｏｒｄ` (fullwidth), `pass\u200bword` (a zero-width space)
and `pass\u00adword` (a soft hyphen). `fold` gives the compared text and, for each of its characters,
the range of the original it came from, so a match found in the folded text is redacted, protected or
reported at its true place in what the user wrote.

NFKC is applied per cluster (a starter and the combining marks after it), so that every folded
character maps to whole original characters; every character of Unicode category Cf (format: zero-width
spaces and joiners, the soft hyphen, bidirectional controls, the byte-order mark) is dropped.
"""

from __future__ import annotations

import dataclasses
import unicodedata


@dataclasses.dataclass(frozen=True, slots=True)
class Folded:
    original: str
    text: str  # what rules are matched against
    starts: tuple[int, ...]  # starts[i]: where in `original` the cluster of text[i] begins
    ends: tuple[int, ...]  # ends[i]: where it ends

    @property
    def changed(self) -> bool:
        return self.text != self.original

    def span(self, start: int, end: int) -> tuple[int, int]:
        """A [start, end) range of the folded text -> the range of the original it covers."""
        if end <= start:
            at = self.starts[start] if start < len(self.starts) else len(self.original)
            return at, at
        return self.starts[start], self.ends[end - 1]

    def tail_start(self, keep: int) -> int:
        """Where in the original the part begins whose folded form is the last `keep` characters
        (0 when the whole text folds to `keep` characters or fewer)."""
        if keep <= 0:
            return len(self.original)
        return 0 if keep >= len(self.text) else self.starts[len(self.text) - keep]


def fold(text: str) -> Folded:
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        j = i + 1
        while j < n and unicodedata.combining(text[j]):
            j += 1
        cluster = "".join(c for c in text[i:j] if unicodedata.category(c) != "Cf")
        if cluster:
            normal = unicodedata.normalize("NFKC", cluster)
            normal = "".join(c for c in normal if unicodedata.category(c) != "Cf")
            out.append(normal)
            starts += [i] * len(normal)
            ends += [j] * len(normal)
        i = j
    return Folded(text, "".join(out), tuple(starts), tuple(ends))


def fold_text(text: str) -> str:
    """The folded text alone (for rule terms)."""
    return fold(text).text
