"""Apply the protect rules to a request's messages: placeholders in, or spans marked for noise.

Placeholders are typed and numbered per request (`<EMAIL_1>`, `<PERSON_2>`), the same value
getting the same placeholder in every message, and a number is skipped when its placeholder
already appears in the user's own text, so restoring can never replace something the user
wrote. The mapping lives only in this object, for one request: never logged, sent or stored.
"""

from __future__ import annotations

import dataclasses

from edge_proxy.spans.detect import Span, SpanDetector
from edge_proxy.spans.restore import placeholder


@dataclasses.dataclass(slots=True)
class ProtectedPrompt:
    messages: list[dict[str, str]]  # placeholders substituted; noise spans left as text
    mapping: dict[str, str]  # placeholder -> original value
    noisy: list[tuple[int, int, int]]  # (message index, start, end) in messages[i]["content"] to send noised
    spans: list[tuple[int, Span]]  # every detected span: (message index, span in the original content)

    @property
    def changed(self) -> bool:
        return bool(self.spans)

    def labels(self) -> list[str]:
        return [s.label for _, s in self.spans]


class _Numbering:
    def __init__(self, taken_text: str):
        self.taken_text = taken_text
        self.by_value: dict[tuple[str, str], str] = {}
        self.next: dict[str, int] = {}

    def placeholder_for(self, label: str, value: str) -> str:
        key = (label, value)
        if key not in self.by_value:
            n = self.next.get(label, 1)
            while placeholder(label, n) in self.taken_text:
                n += 1
            self.by_value[key] = placeholder(label, n)
            self.next[label] = n + 1
        return self.by_value[key]


def protect(detector: SpanDetector, messages: list[dict[str, str]]) -> ProtectedPrompt:
    """Every message's content (system, user and earlier assistant turns all reach the core)."""
    numbering = _Numbering("\n".join(m["content"] for m in messages))
    out, noisy, found = [], [], []
    mapping: dict[str, str] = {}
    for i, msg in enumerate(messages):
        text = msg["content"]
        spans = detector.find(text)
        found += [(i, s) for s in spans]
        parts, cursor, shift = [], 0, 0
        for s in spans:
            parts.append(text[cursor:s.start])
            value = text[s.start:s.end]
            if s.protection == "noise":
                noisy.append((i, s.start + shift, s.end + shift))
                parts.append(value)
            else:
                ph = numbering.placeholder_for(s.label, value)
                mapping[ph] = value
                parts.append(ph)
                shift += len(ph) - len(value)
            cursor = s.end
        parts.append(text[cursor:])
        out.append({**msg, "content": "".join(parts)})
    return ProtectedPrompt(out, mapping, noisy, found)
