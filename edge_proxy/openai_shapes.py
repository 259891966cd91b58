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


def usage(gens: list[Generation]) -> dict[str, int]:
    """The prompt counts once, however many choices were generated from it."""
    prompt = gens[0].prompt_tokens
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def group_usage(groups: list[list[Generation]]) -> dict[str, int]:
    """Usage of several prompts (legacy completions take a list): each prompt counts once, with all its choices."""
    each = [usage(gens) for gens in groups]
    return {k: sum(u[k] for u in each) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def completion_object(ids: ChatIds, choices: list[dict[str, Any]], gens: list[Generation]) -> dict[str, Any]:
    return {**ids.base("chat.completion"), "choices": choices, "usage": usage(gens)}


def chunk(ids: ChatIds, index: int, delta: dict[str, Any], finish_reason: str | None, with_usage: bool,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = {**ids.base("chat.completion.chunk"),
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        obj["usage"] = None
    return obj


def usage_chunk(ids: ChatIds, gens: list[Generation]) -> dict[str, Any]:
    return {**ids.base("chat.completion.chunk"), "choices": [], "usage": usage(gens)}
