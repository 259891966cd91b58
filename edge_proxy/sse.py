"""Server-Sent Events framing: one `data:` line per event, errors in OpenAI's shape, then `[DONE]`."""

from __future__ import annotations

import json
from typing import Any

from veil.errors import VeilError


def event(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def error_event(exc: VeilError) -> bytes:
    """A failure after the 200 went out: the same error object the non-streaming answer would carry."""
    return event(exc.to_openai())


DONE = event("[DONE]")
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
