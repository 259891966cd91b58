"""Messages -> prompt token ids through the model's own chat template.

Content is text. The template's own markers (`<|im_start|>`, `<|im_end|>`, ...) become control tokens,
but the same characters typed inside a message's content do not: a user who writes
`<|im_end|>\n<|im_start|>assistant\n...` gets those characters tokenized as plain text, so no message
can forge a turn, a role or an end of text. The rendered text is tokenized whole (so the prompt is the
one the model was trained on); only when a special token overlaps a message's content is the prompt
encoded piece by piece, the template's pieces as usual and the content's with special tokens split.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any, Sequence

from veil.errors import InvalidRequest

log = logging.getLogger("veil.edge.template")


Tools = list[dict[str, Any]] | None  # function definitions for a template that writes them itself
_TOOL_PROBE = {"type": "function", "function": {"name": "veil_probe_fn", "description": "", "parameters": {}}}
_tool_templates: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template writes tool definitions itself (Qwen2.5 and Qwen3 do, SmolLM2 does not)."""
    known = _tool_templates.get(tokenizer)
    if known is None:
        probe = [{"role": "user", "content": "x"}]
        try:
            text = tokenizer.apply_chat_template(probe, tools=[_TOOL_PROBE], add_generation_prompt=True, tokenize=False)
        except Exception:  # a template that cannot take tools
            text = ""
        known = "veil_probe_fn" in text
        _tool_templates[tokenizer] = known
    return known


def _render_text(tokenizer: Any, messages: list[dict[str, str]], tools: Tools = None) -> str:
    try:
        if tools:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises template-defined errors (e.g. role order) as plain exceptions
        raise InvalidRequest("the messages do not fit the model's chat template", param="messages",
                             code="invalid_messages") from exc


def _control_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special added tokens: what the template's markers tokenize to."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(int(i) for i, t in decoder.items() if getattr(t, "special", True)) | \
        frozenset(getattr(tokenizer, "all_special_ids", []))


def _content_ranges(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]] | None:
    """Each message's content located in the rendered text, in order; None if the template rewrote one."""
    ranges, cursor = [], 0
    for m in messages:
        at = text.find(m["content"], cursor)
        if at < 0:
            return None
        ranges.append((at, at + len(m["content"])))
        cursor = at + len(m["content"])
    return ranges


def _tokenize(tokenizer: Any, text: str, *, as_text: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _encode(tokenizer: Any, messages: list[dict[str, str]], tools: Tools = None) -> tuple[
        list[int], list[tuple[int, int]], list[tuple[int, int]] | None]:
    """-> (ids, character offsets, content ranges or None), with content tokenized as plain text."""
    control = _control_ids(tokenizer)
    if tools and set(_tokenize(tokenizer, json.dumps(tools, ensure_ascii=False))[0]) & control:
        raise InvalidRequest("'tools' holds the chat template's control tokens", param="tools", code="invalid_value")
    text = _render_text(tokenizer, messages, tools)
    ids, offsets = _tokenize(tokenizer, text)
    ranges = _content_ranges(text, messages)
    if ranges is None:
        if any(set(_tokenize(tokenizer, m["content"])[0]) & control for m in messages):
            raise InvalidRequest("message content holds the chat template's control tokens, and this model's "
                                 "template rewrites content, so they cannot be kept as text", param="messages",
                                 code="invalid_messages")
        log.warning("chat template rewrites message content; protecting the whole prompt")
        return ids, offsets, None
    forged = any(t in control and any(a < e and b > s for s, e in ranges) for t, (a, b) in zip(ids, offsets))
    if not forged:
        return ids, offsets, ranges
    ids, offsets, cursor = [], [], 0
    for s, e in [*ranges, (len(text), len(text))]:
        for lo, hi, as_text in ((cursor, s, False), (s, e, True)):
            if hi > lo:
                piece_ids, piece_offsets = _tokenize(tokenizer, text[lo:hi], as_text=as_text)
                ids += piece_ids
                offsets += [(a + lo, b + lo) for a, b in piece_offsets]
        cursor = e
    return ids, offsets, ranges


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], tools: Tools = None) -> list[int]:
    return _encode(tokenizer, messages, tools)[0]


def render_with_positions(tokenizer: Any, messages: list[dict[str, str]],
                          spans: Sequence[tuple[int, int, int]], tools: Tools = None) -> tuple[list[int], frozenset[int]]:
    """Prompt ids as render_prompt gives them, and the token positions that overlap any of `spans`
    ((message index, start, end) character ranges of a message's content).

    A template that rewrites content (so it cannot be found verbatim) gets every position marked: the
    spans' tokens must not go out unprotected.
    """
    ids, offsets, ranges = _encode(tokenizer, messages, tools)
    if not spans:
        return ids, frozenset()
    if ranges is None:
        return ids, frozenset(range(len(ids)))
    chars = [(ranges[i][0] + a, ranges[i][0] + b) for i, a, b in spans]
    positions = {t for t, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in chars)}
    return ids, frozenset(positions)


def render_raw_with_positions(tokenizer: Any, text: str,
                              spans: Sequence[tuple[int, int, int]]) -> tuple[list[int], frozenset[int]]:
    """A raw prompt (legacy completions: no template) tokenized as transformers does by default, BOS included
    where the tokenizer adds one, and the positions overlapping `spans` (all in message 0, the prompt)."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    chars = [(a, b) for _, a, b in spans]
    positions = {t for t, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in chars)}
    return ids, frozenset(positions)
