"""One choice's reply as the client sees it: text deltas become content or tool-call deltas, log-probabilities
ride along, and the finish reason says whether tools were called."""

from __future__ import annotations

from typing import Any, Callable

from edge_proxy.generation import Generation
from edge_proxy.logprobs import chat_logprobs
from edge_proxy.tools import ToolCallParser, ToolSpec


class ChoiceReply:
    def __init__(self, index: int, gen: Generation, tools: ToolSpec | None, token_bytes: Callable[[int], bytes]):
        self.index, self.gen, self.tools, self.token_bytes = index, gen, tools, token_bytes
        self.parser = ToolCallParser() if tools is not None else None
        self.text = ""  # the whole reply text, for the non-streaming answer
        self._sent_logprobs = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        """A text delta -> the delta objects to send for it."""
        self.text += text
        return self.parser.feed(text) if self.parser is not None else [{"content": text}]

    def finish(self) -> list[dict[str, Any]]:
        return self.parser.finish() if self.parser is not None else []

    def new_logprobs(self) -> dict[str, Any] | None:
        """The log-probabilities of the tokens sampled since the last call (streaming), if asked for."""
        if self.gen.logprobs is None:
            return None
        entries = self.gen.token_logprobs[self._sent_logprobs:]
        self._sent_logprobs = len(self.gen.token_logprobs)
        return chat_logprobs(entries, self.token_bytes)

    @property
    def finish_reason(self) -> str | None:
        reason = self.gen.finish_reason
        if reason == "stop" and self.parser is not None and self.parser.calls:
            # OpenAI says "stop" when tool_choice named the function, "tool_calls" when the model chose to call
            assert self.tools is not None
            return "stop" if self.tools.named else "tool_calls"
        return reason

    def message(self) -> dict[str, Any]:
        """The non-streaming choice."""
        self.finish()
        calls = self.parser.calls if self.parser is not None else []
        content = self.parser.content if self.parser is not None else self.text
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else content, "refusal": None}
        if calls:
            message["tool_calls"] = [c.as_openai() for c in calls]
        logprobs = None if self.gen.logprobs is None else chat_logprobs(self.gen.token_logprobs, self.token_bytes)
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason}
