"""OpenAI response objects for chat completions (framing for streams is in edge_proxy/sse.py)."""

from __future__ import annotations

import time
from typing import Any

from edge_proxy.generation import Generation


class ChatIds:
    """Fields every object of one response shares."""

    def __init__(self, completion_id: str, model: str, fingerprint: str):
        self.id, self.model, self.fingerprint = completion_id, model, fingerprint
        self.created = int(time.time())

    def base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


def usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.total_tokens}


def completion_object(ids: ChatIds, text: str, gen: Generation) -> dict[str, Any]:
    return {
        **ids.base("chat.completion"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": gen.finish_reason,
        }],
        "usage": usage(gen),
    }


def chunk(ids: ChatIds, delta: dict[str, Any], finish_reason: str | None, with_usage: bool) -> dict[str, Any]:
    obj = {**ids.base("chat.completion.chunk"),
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        obj["usage"] = None
    return obj


def usage_chunk(ids: ChatIds, gen: Generation) -> dict[str, Any]:
    return {**ids.base("chat.completion.chunk"), "choices": [], "usage": usage(gen)}
