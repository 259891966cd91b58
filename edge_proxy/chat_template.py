"""Messages -> prompt token ids through the model's own chat template."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from veil.errors import InvalidRequest

log = logging.getLogger("veil.edge.template")


def _render_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises template-defined errors (e.g. role order) as plain exceptions
        raise InvalidRequest("the messages do not fit the model's chat template", param="messages",
                             code="invalid_messages") from exc


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer(_render_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def render_with_positions(tokenizer: Any, messages: list[dict[str, str]],
                          spans: Sequence[tuple[int, int, int]]) -> tuple[list[int], frozenset[int]]:
    """Prompt ids as render_prompt gives them, and the token positions that overlap any of `spans`
    ((message index, start, end) character ranges of a message's content).

    Each message's content is located in the rendered text in order. A template that rewrites
    content (so it cannot be found verbatim) gets every position marked: the spans' tokens
    must not go out unprotected.
    """
    text = _render_text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not spans:
        return ids, frozenset()
    starts, cursor = [], 0
    for m in messages:
        at = text.find(m["content"], cursor)
        if at < 0:
            log.warning("chat template rewrites message content; protecting the whole prompt")
            return ids, frozenset(range(len(ids)))
        starts.append(at)
        cursor = at + len(m["content"])
    ranges = [(starts[i] + a, starts[i] + b) for i, a, b in spans]
    positions = {t for t, (a, b) in enumerate(enc["offset_mapping"])
                 if any(a < e and b > s for s, e in ranges)}
    return ids, frozenset(positions)
