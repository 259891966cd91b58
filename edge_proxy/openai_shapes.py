"""OpenAI response objects and SSE framing for chat completions."""

from __future__ import annotations

import json
import time
from typing import Any

from edge_proxy.generate import Completion
from veil.errors import VeilError


class ChatIds:
    """Fields every object of one response shares."""

    def __init__(self, completion_id: str, model: str, fingerprint: str):
        self.id, self.model, self.fingerprint = completion_id, model, fingerprint
        self.created = int(time.time())

    def base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


def usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def completion_object(ids: ChatIds, text: str, done: Completion) -> dict[str, Any]:
    return {
        **ids.base("chat.completion"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }],
        "usage": usage(done),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def chunk(ids: ChatIds, delta: dict[str, Any], finish_reason: str | None, with_usage: bool) -> bytes:
    obj = {**ids.base("chat.completion.chunk"),
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        obj["usage"] = None
    return sse(obj)


def usage_chunk(ids: ChatIds, done: Completion) -> bytes:
    return sse({**ids.base("chat.completion.chunk"), "choices": [], "usage": usage(done)})


def error_event(exc: VeilError) -> bytes:
    return sse(exc.to_openai())


DONE = sse("[DONE]")
