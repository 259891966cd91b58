"""Put the protected values back into a streamed reply, so the client never sees a placeholder.

The model only ever saw typed, numbered placeholders (`<EMAIL_1>`); its reply arrives a few
characters at a time. A placeholder may be cut anywhere between two pieces, so the restorer
holds back the one tail that could still grow into a placeholder and emits everything else at
once: the hold is never more than a placeholder's length, and a `<` that cannot start one is
released immediately. Values go straight out and are never scanned again, so a value that
contains `<` or looks like a placeholder is emitted as it is.

Nothing here logs: the mapping holds the user's real values.
"""

from __future__ import annotations

import re

_LABEL = r"[A-Z][A-Z0-9]{0,23}"  # admin/guardrails.py validates protect-rule labels against the same grammar
_NUMBER = r"[1-9][0-9]{0,5}"
PLACEHOLDER = re.compile(rf"<({_LABEL})_({_NUMBER})>")
# Every proper prefix of a placeholder, from its `<`: the only text worth holding back.
_PREFIX = re.compile(rf"<(?:{_LABEL}(?:_(?:{_NUMBER})?)?)?")
_WORD = re.compile(r"\w+")


def placeholder(label: str, n: int) -> str:
    """`<LABEL_N>`; refuses what the restorer could not recognise, so nothing is protected unrestorably."""
    text = f"<{label}_{n}>"
    if not isinstance(n, int) or isinstance(n, bool) or not PLACEHOLDER.fullmatch(text):
        raise ValueError(f"placeholder needs a label matching {_LABEL} and a number from 1 to 999999, "
                         f"got {label!r} and {n!r}")
    return text


class PlaceholderRestorer:
    """Replaces placeholders in streamed text by their values; never emits a placeholder or a fragment of one.

    `feed` may be called with pieces cut at any character; the output, `restored` and `mangled`
    are the same however the text was cut (only when the output appears differs).

    `mangled` is a metric of how often the model damaged or invented a placeholder. It counts,
    each occurrence once, in the model's own text (never in restored values):
      * a complete placeholder that is not in the mapping (`<EMAIL_7>`, `<PHONE_1>`): it is
        emitted unchanged, never guessed;
      * a known placeholder's inner text standing as a whole word outside a complete placeholder,
        where `\\w` characters make up words: bare `EMAIL_1`, `EMAIL_1>`, or `<EMAIL_1` whose `>`
        never came (followed by a space);
      * a fragment of a known placeholder cut off at the end of the stream, which is dropped.
    """

    def __init__(self, mapping: dict[str, str]):
        if not all(PLACEHOLDER.fullmatch(key) for key in mapping):
            raise ValueError("every mapping key must be a placeholder <LABEL_N>")  # keys not echoed: keep values out
        self._mapping = dict(mapping)
        self._inner = {key[1:-1] for key in self._mapping}
        self._longest = max((len(word) for word in self._inner), default=0)
        self._pending = ""  # held back: empty or a proper prefix of a placeholder
        self._word = ""  # the word the emitted model text ends in, cut past the longest inner text
        self.restored = 0
        self.mangled = 0

    def feed(self, text: str) -> str:
        """-> the restored text that is now safe to emit."""
        pending, out, pos = self._pending + text, [], 0
        for m in PLACEHOLDER.finditer(pending):
            out.append(self._model_text(pending[pos:m.start()]))
            self._end_word()
            value = self._mapping.get(m.group())
            if value is None:
                self.mangled += 1
                out.append(m.group())
            else:
                self.restored += 1
                out.append(value)
            pos = m.end()
        rest = pending[pos:]
        # A placeholder holds a single `<`, so only the tail from the last one can still become one.
        cut = rest.rfind("<")
        if cut < 0 or not _PREFIX.fullmatch(rest, cut):
            cut = len(rest)
        out.append(self._model_text(rest[:cut]))
        self._pending = rest[cut:]
        return "".join(out)

    def flush(self) -> str:
        """End of stream: the held-back tail can no longer complete. A fragment of a known placeholder
        (the token limit cut it, as in `<EMAIL_1`) is dropped and counted as mangled, so the client never
        sees part of a placeholder; any other tail (`a <`, `<X_9`) goes out as it is."""
        tail, self._pending = self._pending, ""
        if len(tail) > 1 and any(key.startswith(tail) for key in self._mapping):
            self._word = ""
            self.mangled += 1
            return ""
        out = self._model_text(tail)
        self._end_word()
        return out

    def _model_text(self, text: str) -> str:
        """Emitted model text (not a value): watch it for known inner text standing as a word."""
        if not text or not self._inner:
            return text
        joined, self._word = self._word + text, ""
        for m in _WORD.finditer(joined):
            if m.end() < len(joined):
                self._count_near_miss(m.group())
            else:  # may go on in the next piece; longer than any inner text it can never match
                self._word = m.group()[: self._longest + 1]
        return text

    def _end_word(self) -> None:
        self._count_near_miss(self._word)
        self._word = ""

    def _count_near_miss(self, word: str) -> None:
        if word in self._inner:
            self.mangled += 1
