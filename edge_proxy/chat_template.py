"""Messages -> prompt token ids through the model's own chat template."""

from __future__ import annotations

from typing import Any

from veil.errors import InvalidRequest


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises template-defined errors (e.g. role order) as plain exceptions
        raise InvalidRequest("the messages do not fit the model's chat template", param="messages",
                             code="invalid_messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
