"""Guardrails at the edge: blocklist terms and regular expressions, each `block` or `redact`,
on the prompt before anything reaches the core, and optionally on the streamed output; and
`protect` rules (terms, a pattern, or built-in entity recognizers) whose spans the edge keeps
to itself, replaced by placeholders or sent under heavy noise (edge_proxy/spans).

A blocked request is told the rule id only; the matched text is never echoed or logged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

from veil.errors import InvalidRequest, PolicyViolation

ACTIONS = ("block", "redact", "protect")
TARGETS = ("prompt", "output")
PROTECTIONS = ("placeholder", "noise")
# Built-in recognizers a protect rule may name, and the placeholder label each one's spans get.
ENTITY_LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP",
    "US_SSN": "SSN",
    "CRYPTO": "CRYPTO",
    "PERSON": "PERSON",  # needs a named-entity model installed locally; never fetched
}
DEFAULT_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "CRYPTO",
                    "PERSON"]
_LABEL = re.compile(r"^[A-Z][A-Z0-9]{0,23}$")  # the placeholder grammar of edge_proxy/spans/restore.py
REDACTED = "[REDACTED]"
_PATTERN_HOLDBACK = 64  # output text held back so a pattern match can still stop it before it is sent
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclasses.dataclass(slots=True)
class GuardrailRule:
    id: str
    action: str
    pattern: str = ""
    terms: list[str] = dataclasses.field(default_factory=list)
    applies_to: list[str] = dataclasses.field(default_factory=lambda: ["prompt"])
    description: str = ""
    entities: list[str] = dataclasses.field(default_factory=list)  # protect only: built-in recognizers
    label: str = ""  # protect only: placeholder type of a pattern/terms rule, e.g. PERSON -> <PERSON_1>
    protection: str = "placeholder"  # protect only: placeholder | noise

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise InvalidRequest("guardrail id must be 1-64 letters, digits, '_', '.' or '-'", param="id")
        if self.action not in ACTIONS:
            raise InvalidRequest(f"guardrail action must be one of {', '.join(ACTIONS)}", param="action")
        if self.entities and self.action != "protect":
            raise InvalidRequest("entities are for protect rules only", param="entities")
        if sum(map(bool, (self.pattern, self.terms, self.entities))) != 1:
            raise InvalidRequest("a guardrail needs exactly one of a pattern, a list of terms or (protect) a list "
                                 "of entities", param="pattern")
        if not self.applies_to or any(t not in TARGETS for t in self.applies_to):
            raise InvalidRequest(f"applies_to must list some of {', '.join(TARGETS)}", param="applies_to")
        if "output" in self.applies_to and self.action != "block":
            raise InvalidRequest("output rules can only block (the stream stops)", param="action")
        if self.action == "protect":
            self._check_protect()
        self.compile()

    def _check_protect(self) -> None:
        if self.protection not in PROTECTIONS:
            raise InvalidRequest(f"protection must be one of {', '.join(PROTECTIONS)}", param="protection")
        unknown = [e for e in self.entities if e not in ENTITY_LABELS]
        if unknown:
            raise InvalidRequest(f"unknown entity {unknown[0]!r}; known: {', '.join(ENTITY_LABELS)}", param="entities")
        if self.entities and self.label:
            raise InvalidRequest("entity rules take their labels from the entities; drop label", param="label")
        self.label = self.label or ("" if self.entities else "SECRET")
        if self.label and not _LABEL.match(self.label):
            raise InvalidRequest("label must be 1-24 upper-case letters or digits, starting with a letter",
                                 param="label")

    def compile(self) -> re.Pattern[str] | None:
        """The rule's regular expression; None for an entities rule (its recognizers live at the edge)."""
        if self.entities:
            return None
        if self.pattern:
            try:
                return re.compile(self.pattern)
            except re.error as exc:
                raise InvalidRequest(f"guardrail pattern is not a valid regular expression: {exc.msg}",
                                     param="pattern") from None
        parts = []
        for term in self.terms:
            if not isinstance(term, str) or not term.strip():
                raise InvalidRequest("guardrail terms must be non-empty strings", param="terms")
            # word boundaries only where the term itself starts/ends with a word character
            left = r"\b" if re.match(r"\w", term[0]) else ""
            right = r"\b" if re.match(r"\w", term[-1]) else ""
            parts.append(f"{left}{re.escape(term)}{right}")
        return re.compile("|".join(parts), re.IGNORECASE)

    def holdback(self) -> int:
        return max(len(t) for t in self.terms) if self.terms else _PATTERN_HOLDBACK


def rule_from_dict(data: dict[str, Any]) -> GuardrailRule:
    fields = {f.name for f in dataclasses.fields(GuardrailRule)}
    return GuardrailRule(**{k: v for k, v in data.items() if k in fields})


class Guardrails:
    """The compiled rule set of one policy version."""

    def __init__(self, rules: Iterable[GuardrailRule]):
        rules = list(rules)
        self.protect_rules = [r for r in rules if r.action == "protect"]
        compiled = [(r, r.compile()) for r in rules if r.action != "protect"]
        self.prompt_rules = [(r, rx) for r, rx in compiled if rx is not None and "prompt" in r.applies_to]
        self.output_rules = [(r, rx) for r, rx in compiled if rx is not None and "output" in r.applies_to]

    def check_prompt(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
        """-> (messages with redactions applied, ids of redact rules that fired); raises on a block."""
        redacted: list[str] = []
        out = []
        for msg in messages:
            text = msg["content"]
            for rule, rx in self.prompt_rules:
                if not rx.search(text):
                    continue
                if rule.action == "block":
                    raise PolicyViolation(rule.id)
                text = rx.sub(REDACTED, text)
                if rule.id not in redacted:
                    redacted.append(rule.id)
            out.append({**msg, "content": text})
        return out, redacted

    def output_gate(self) -> "OutputGate | None":
        return OutputGate(self.output_rules) if self.output_rules else None


class OutputGate:
    """Holds back the tail of the streamed reply so that a blocked match is never sent."""

    def __init__(self, rules: list[tuple[GuardrailRule, re.Pattern[str]]]):
        self.rules = rules
        self.hold = max(rule.holdback() for rule, _ in rules)
        self.sent_tail = ""  # the last `hold` characters already sent, for matches that straddle
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """-> (text safe to send, id of the rule that blocked or None)."""
        self.pending += text
        window = self.sent_tail + self.pending
        for rule, rx in self.rules:
            if rx.search(window):
                self.pending = ""
                return "", rule.id
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.sent_tail = (self.sent_tail + out)[-self.hold:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
