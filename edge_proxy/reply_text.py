"""Token ids to the text a client may see: detokenize -> restore placeholders -> stop strings -> output rules.

Stop strings and output rules see the restored text, so they are about what the client reads.
"""

from __future__ import annotations

from typing import Any

from admin.guardrails import OutputGate
from edge_proxy.detokenize import IncrementalDetokenizer, StopMatcher
from edge_proxy.spans.restore import PlaceholderRestorer


class ReplyText:
    """One reply's text pipeline; every stage holds back what a later token could still change."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str],
                 restorer: PlaceholderRestorer | None = None, gate: OutputGate | None = None):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopMatcher(stops)
        self.restorer, self.gate = restorer, gate
        self.blocked_rule: str | None = None  # the output rule that ended the reply

    def push(self, token: int) -> tuple[str, str | None]:
        """Text safe to send after one more token, and "stop" or "content_filter" if the reply ends here."""
        text, stopped = self.stop.feed(self._restore(self.detok.push(token)))
        out = self._final(text) if stopped else self._gated(text)
        if self.blocked_rule is not None:
            return out, "content_filter"
        return out, "stop" if stopped else None

    def finish(self) -> tuple[str, str | None]:
        """Once generation ends (EOS or the token limit): the text still held back, and "content_filter"
        if an output rule blocked it."""
        restored = self._restore(self.detok.flush()) + (self.restorer.flush() if self.restorer else "")
        text, stopped = self.stop.feed(restored)
        out = self._final(text if stopped else text + self.stop.flush())
        return out, None if self.blocked_rule is None else "content_filter"

    def _restore(self, text: str) -> str:
        return text if self.restorer is None else self.restorer.feed(text)

    def _gated(self, text: str) -> str:
        if self.gate is None or not text or self.blocked_rule is not None:
            return "" if self.blocked_rule is not None else text
        out, rule = self.gate.feed(text)
        if rule is not None:
            self.blocked_rule = rule
            return ""
        return out

    def _final(self, text: str) -> str:
        out = self._gated(text)
        if self.gate is not None and self.blocked_rule is None:
            out += self.gate.flush()
        return out
