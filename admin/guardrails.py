"""Guardrails at the edge: blocklist terms and regular expressions, each `block` or `redact`,
on the prompt before anything reaches the core, and optionally on the streamed output; and
`protect` rules (terms, a pattern, or built-in entity recognizers) whose spans the edge keeps
to itself, replaced by placeholders or sent under heavy noise (edge_proxy/spans).

A blocked request is told the rule id only; the matched text is never echoed or logged.
Every rule is matched against folded text (admin/textfold.py: NFKC, format characters removed), and
its findings are mapped back to the original, so fullwidth letters or a zero-width space inside a
term do not pass a rule.
"""

from __future__ import annotations

import dataclasses
import re
import re._parser as sre_parse  # type: ignore[import-not-found]  # the stdlib parser has no stubs
from typing import Any, Iterable

from admin.textfold import fold, fold_text
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
MAX_OUTPUT_MATCH = 1024  # an output pattern's longest match, in characters: what the stream must hold back
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
        if "output" in self.applies_to and self.holdback() > MAX_OUTPUT_MATCH:
            raise InvalidRequest(f"an output rule's longest match must be bounded (at most {MAX_OUTPUT_MATCH} "
                                 "characters): the stream holds that much back, so that no match is sent before "
                                 "the rule fires; use bounded repeats such as {0,40} instead of * or +",
                                 param="pattern")

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
        for raw in self.terms:
            if not isinstance(raw, str) or not fold_text(raw).strip():
                raise InvalidRequest("guardrail terms must be non-empty strings", param="terms")
            term = fold_text(raw)
            # word boundaries only where the term itself starts/ends with a word character
            left = r"\b" if re.match(r"\w", term[0]) else ""
            right = r"\b" if re.match(r"\w", term[-1]) else ""
            parts.append(f"{left}{re.escape(term)}{right}")
        return re.compile("|".join(parts), re.IGNORECASE)

    def holdback(self) -> int:
        """The longest text (folded) the rule can match: what an output gate must hold back for it."""
        if self.terms:
            return max(len(fold_text(t)) for t in self.terms)
        return int(sre_parse.parse(self.pattern).getwidth()[1])


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
                folded = fold(text)
                found = [folded.span(m.start(), m.end()) for m in rx.finditer(folded.text)]
                if not found:
                    continue
                if rule.action == "block":
                    raise PolicyViolation(rule.id)
                for start, end in reversed(found):  # from the right, so earlier positions stay valid
                    text = text[:start] + REDACTED + text[end:]
                if rule.id not in redacted:
                    redacted.append(rule.id)
            out.append({**msg, "content": text})
        return out, redacted

    def output_gate(self) -> "OutputGate | None":
        return OutputGate(self.output_rules) if self.output_rules else None


class OutputGate:
    """Holds back the tail of the streamed reply so that a blocked match is never sent.

    Lengths are counted in folded characters: what is held back is the shortest tail of the reply whose
    folded form is as long as the longest match of any rule, however many invisible characters it holds."""

    def __init__(self, rules: list[tuple[GuardrailRule, re.Pattern[str]]]):
        self.rules = rules
        self.hold = max(rule.holdback() for rule, _ in rules)
        self.sent_tail = ""  # the end of what was sent (folding to `hold` characters), for matches that straddle
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """-> (text safe to send, id of the rule that blocked or None)."""
        self.pending += text
        window = fold(self.sent_tail + self.pending)
        for rule, rx in self.rules:
            if rx.search(window.text):
                self.pending = ""
                return "", rule.id
        # keep the tail that folds to `hold` characters: no match is longer, so none can have begun in what
        # leaves (the tail is longer in the original where it holds invisible characters)
        keep_from = max(window.tail_start(self.hold), len(self.sent_tail))
        cut = keep_from - len(self.sent_tail)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        sent = self.sent_tail + out
        self.sent_tail = sent[fold(sent).tail_start(self.hold):]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
