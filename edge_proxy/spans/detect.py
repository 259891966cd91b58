"""Which spans of a text are sensitive, by the policy's protect rules.

Term and pattern rules are the operator's own; entity rules use the built-in recognizers.
Overlapping findings are merged into one span covering both (keeping too much beats leaking
the part one rule missed), labelled by the longest finding.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from admin.guardrails import ENTITY_LABELS, GuardrailRule
from admin.textfold import fold
from edge_proxy.spans.recognizers import RecognizerSet


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    label: str  # placeholder type, e.g. EMAIL -> <EMAIL_1>
    rule_id: str
    protection: str  # placeholder | noise
    score: float = 1.0  # recognizer confidence (operator rules: 1.0); breaks ties between equal-length findings


class SpanDetector:
    """The compiled protect rules of one policy version."""

    def __init__(self, rules: Sequence[GuardrailRule], ner_model: str = ""):
        self.rules = [r for r in rules if r.action == "protect"]
        self._regex: list[tuple[GuardrailRule, re.Pattern[str]]] = []
        self._entity_rules: list[tuple[GuardrailRule, RecognizerSet]] = []
        for rule in self.rules:
            rx = rule.compile()
            if rx is not None:
                self._regex.append((rule, rx))
            else:
                self._entity_rules.append((rule, RecognizerSet(rule.entities, ner_model)))

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def warm(self) -> None:
        """Build the recognizers now (imports Presidio, loads a NER model) rather than on a first request."""
        for _, recognizers in self._entity_rules:
            _ = recognizers.recognizers

    @property
    def unavailable(self) -> list[str]:
        return [e for _, rs in self._entity_rules for e in rs.unavailable]

    def find(self, text: str) -> list[Span]:
        """Sorted, non-overlapping sensitive spans of `text`.

        Term and pattern rules match the folded text (NFKC, invisible characters removed); recognizers
        run on the text as written and, where folding changes it, on the folded text too. Every finding
        is mapped back to the original."""
        folded = fold(text)
        found: list[Span] = []
        for rule, rx in self._regex:
            found += [Span(*folded.span(m.start(), m.end()), rule.label, rule.id, rule.protection)
                      for m in rx.finditer(folded.text) if m.end() > m.start()]
        for rule, recognizers in self._entity_rules:
            found += [Span(f.start, f.end, ENTITY_LABELS[f.entity], rule.id, rule.protection, f.score)
                      for f in recognizers.find(text) if f.end > f.start]
            if folded.changed:
                found += [Span(*folded.span(f.start, f.end), ENTITY_LABELS[f.entity], rule.id, rule.protection,
                               f.score) for f in recognizers.find(folded.text) if f.end > f.start]
        return _merge(found)


def _merge(spans: list[Span]) -> list[Span]:
    """Union of overlapping spans; the longest member (then the most confident: a dotted IP is also a weak
    phone match) names the label, rule and protection.

    A merged span is noised only if every member asked for noise: placeholders hide more.
    """
    out: list[Span] = []
    groups: list[list[Span]] = []
    for s in sorted(spans, key=lambda s: (s.start, -(s.end - s.start))):
        if groups and s.start < max(g.end for g in groups[-1]):
            groups[-1].append(s)
        else:
            groups.append([s])
    for group in groups:
        lead = max(group, key=lambda s: (s.end - s.start, s.score, -s.start))
        protection = "noise" if all(s.protection == "noise" for s in group) else "placeholder"
        out.append(Span(group[0].start, max(s.end for s in group), lead.label, lead.rule_id, protection, lead.score))
    return out
