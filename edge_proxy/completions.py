"""Legacy completions (`POST /v1/completions`): the request as the chat route's values plus its prompts and echo,
each choice's text and log-probabilities as that endpoint reports them, and its text_completion objects.

A prompt is text, tokenized as it is (no chat template). Token-id prompts are taken only when they are exactly
how the tokenizer encodes their text: the edge runs guardrails and span protection on the text and tokenizes it
itself, so ids it would not produce from that text could not be kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from edge_proxy import openai_shapes as shapes
from edge_proxy.generation import Generation
from edge_proxy.logprobs import TokenLogprob, completion_logprobs
from edge_proxy.schemas import (
    MAX_N,
    ChatRequest,
    int_param,
    invalid_value,
    load_object,
    sampling_param,
    stop_param,
    stream_param,
)
from veil.errors import InvalidRequest

MAX_PROMPTS = 16  # prompts per request: generated one after another on the request's core session
MAX_LOGPROBS = 5  # the legacy endpoint's limit on alternatives per token
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


@dataclasses.dataclass(slots=True)
class CompletionRequest:
    chat: ChatRequest  # what every prompt shares: sampling, stop, n, max_tokens, stream, logprobs (messages=[])
    prompts: list[str]
    echo: bool = False

    @property
    def prompt_logprobs(self) -> int | None:
        """Alternatives for the prompt tokens' log-probabilities: asked for by echo with logprobs."""
        return self.chat.logprobs if self.echo else None


def _unsupported(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def _choices(body: dict[str, Any]) -> int:
    """`n`; `best_of` only as n itself (each choice is returned, none is picked by score)."""
    n = int_param(body, "n", 1, MAX_N) or 1
    best_of = int_param(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise _unsupported("'best_of' other than 'n' is not supported", "best_of")
    return n


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _text_of_ids(ids: list[int], i: int, vocab_size: int, tokenizer: Any) -> str:
    """The text these ids encode, if tokenizing it gives exactly them back (so the model sees the same prompt)."""
    if not all(0 <= t < vocab_size for t in ids):
        raise invalid_value(f"prompt[{i}]: token ids must be in [0, {vocab_size})", "prompt")
    added = list(tokenizer("", add_special_tokens=True)["input_ids"])  # what the tokenizer puts before any text
    body = ids[len(added):] if added and ids[:len(added)] == added else ids
    try:
        text = tokenizer.decode(body, clean_up_tokenization_spaces=False)
    except Exception:  # an id the embedding has but the tokenizer lacks (a padded vocabulary)
        text = ""
    if not text or list(tokenizer(text, add_special_tokens=True)["input_ids"]) != ids:
        raise invalid_value(f"prompt[{i}]: these token ids are not how this model's tokenizer encodes their text, "
                            "which the edge tokenizes itself; send the text instead", "prompt")
    return text


def _prompts(raw: Any, vocab_size: int, tokenizer: Any) -> list[str]:
    if raw is None:
        raise InvalidRequest("'prompt' is required", param="prompt", code="missing_required_parameter")
    items = [raw] if isinstance(raw, str) or _is_ids(raw) else raw
    if not isinstance(items, list) or not items:
        raise invalid_value(f"'prompt' must be {_PROMPT_SHAPES}", "prompt")
    if len(items) > MAX_PROMPTS:
        raise invalid_value(f"'prompt' may hold at most {MAX_PROMPTS} prompts, got {len(items)}", "prompt")
    texts = []
    for i, item in enumerate(items):
        if _is_ids(item):
            texts.append(_text_of_ids(item, i, vocab_size, tokenizer))
        elif isinstance(item, str) and item:
            texts.append(item)
        else:
            raise invalid_value(f"prompt[{i}] must be a non-empty string or list of token ids", "prompt")
    return texts


def parse_completion_request(raw: bytes, vocab_size: int, tokenizer: Any) -> CompletionRequest:
    body = load_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model", code="missing_required_parameter")
    if body.get("suffix") is not None:
        raise _unsupported("'suffix' (insertion) is not supported by this model", "suffix")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise invalid_value("'echo' must be a boolean", "echo")
    stream, include_usage = stream_param(body)
    max_tokens = int_param(body, "max_tokens", 1)
    chat = ChatRequest(model=model, messages=[], sampling=sampling_param(body, vocab_size), stream=stream,
                       include_usage=include_usage, stop=stop_param(body),
                       max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, n=_choices(body),
                       logprobs=int_param(body, "logprobs", 0, MAX_LOGPROBS))
    return CompletionRequest(chat, _prompts(body.get("prompt"), vocab_size, tokenizer), echo)


class CompletionChoice:
    """One choice: its reply text, and its log-probabilities as parallel lists with offsets into the prompt and text
    (OpenAI counts text_offset from the prompt's start, echoed or not)."""

    def __init__(self, index: int, gen: Generation, first: Generation, prompt: str, echo: bool,
                 token_bytes: Callable[[int], bytes]):
        self.index, self.gen, self.prompt, self.echo, self.token_bytes = index, gen, prompt, echo, token_bytes
        self.first = first  # the prompt's first choice: it alone holds the prompt's log-probabilities
        self.text = ""
        self._sent = 0  # reply log-probabilities already reported
        self._offset = 0 if echo else len(prompt)

    def _logprobs(self, entries: list[TokenLogprob | None], ids: list[int]) -> dict[str, Any]:
        out = completion_logprobs(entries, self.token_bytes, ids, self._offset)
        self._offset += sum(len(t) for t in out["tokens"])
        return out

    def echoed(self) -> tuple[str, dict[str, Any] | None]:
        """The prompt this choice's text opens with (echo), and its tokens' log-probabilities if asked for."""
        if self.gen.logprobs is None:
            return self.prompt, None
        return self.prompt, self._logprobs(self.first.prompt_token_logprobs, self.first.prompt_ids)

    def new_logprobs(self) -> dict[str, Any] | None:
        """The reply tokens' log-probabilities since the last call, if asked for."""
        if self.gen.logprobs is None:
            return None
        entries: list[TokenLogprob | None] = list(self.gen.token_logprobs[self._sent:])
        self._sent += len(entries)
        return self._logprobs(entries, [e.token for e in entries if e is not None])

    def choice(self) -> dict[str, Any]:
        """The non-streaming choice."""
        prompt, logprobs = self.echoed() if self.echo else ("", None)
        tail = self.new_logprobs()
        if logprobs is not None and tail is not None:
            tail = {k: logprobs[k] + tail[k] for k in logprobs}
        return {"index": self.index, "text": prompt + self.text, "logprobs": tail, "finish_reason": self.gen.finish_reason}


def completion_object(ids: shapes.ChatIds, choices: list[dict[str, Any]], groups: list[list[Generation]]) -> dict[str, Any]:
    return {**ids.base("text_completion"), "choices": choices, "usage": shapes.group_usage(groups)}


def chunk(ids: shapes.ChatIds, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
          with_usage: bool) -> dict[str, Any]:
    obj = {**ids.base("text_completion"),
           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        obj["usage"] = None
    return obj


def usage_chunk(ids: shapes.ChatIds, groups: list[list[Generation]]) -> dict[str, Any]:
    return {**ids.base("text_completion"), "choices": [], "usage": shapes.group_usage(groups)}
