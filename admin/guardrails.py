"""Guardrails at the edge: blocklist terms and regular expressions, each `block` or `redact`,
on the prompt before anything reaches the core, and optionally on the streamed output.

A blocked request is told the rule id only; the matched text is never echoed or logged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

from veil.errors import InvalidRequest, PolicyViolation

ACTIONS = ("block", "redact")
TARGETS = ("prompt", "output")
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

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise InvalidRequest("guardrail id must be 1-64 letters, digits, '_', '.' or '-'", param="id")
        if self.action not in ACTIONS:
            raise InvalidRequest(f"guardrail action must be one of {', '.join(ACTIONS)}", param="action")
        if bool(self.pattern) == bool(self.terms):
            raise InvalidRequest("a guardrail needs exactly one of a pattern or a list of terms", param="pattern")
        if not self.applies_to or any(t not in TARGETS for t in self.applies_to):
            raise InvalidRequest(f"applies_to must list some of {', '.join(TARGETS)}", param="applies_to")
        if "output" in self.applies_to and self.action != "block":
            raise InvalidRequest("output rules can only block (the stream stops)", param="action")
        self.compile()

    def compile(self) -> re.Pattern[str]:
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
        compiled = [(r, r.compile()) for r in rules]
        self.prompt_rules = [(r, rx) for r, rx in compiled if "prompt" in r.applies_to]
        self.output_rules = [(r, rx) for r, rx in compiled if "output" in r.applies_to]

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
