"""schemathesis hooks for the campaign (loaded through SCHEMATHESIS_HOOKS=tests.fuzz.hooks).

The static schema cannot state a deployment's runtime bounds: the one model served, its vocabulary, the
context left for max_tokens. Drawn blindly, nearly every chat request stops at one of those with a 400
and generation is never reached. So every chat body names the served model (FUZZ_MODEL; a `model` of the
wrong type is kept), and half of them, chosen by the body itself so runs reproduce, are also brought within
those bounds, so that they go through policy, tokenizing and a real generation on the core.
"""

from __future__ import annotations

import os
import random
from typing import Any

import schemathesis

VOCAB = 49152  # the bundled tokenizer's, which the tiny test models share
ROOM = 16  # new tokens that always fit the campaign core's 96-token sessions after a short prompt


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    if ctx.operation.path != "/v1/chat/completions" or not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = os.environ["FUZZ_MODEL"]
    if random.Random(repr(sorted(body.items(), key=lambda kv: kv[0]))).random() < 0.5:
        _within_runtime_bounds(body)
    return body


def _within_runtime_bounds(body: dict) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool):
            body[name] = 1 + body[name] % ROOM
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = ROOM
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if k.isdigit() and int(k) < VOCAB}
    if not body.get("stream"):
        body.pop("stream_options", None)
    messages = body.get("messages")
    if isinstance(messages, list):  # a short prompt, so ROOM tokens fit
        body["messages"] = [{**m, "content": m["content"][:40]} if isinstance(m, dict) and isinstance(
            m.get("content"), str) else m for m in messages[:3]]
