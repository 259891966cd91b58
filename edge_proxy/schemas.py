"""OpenAI chat-completion request parsing: raw JSON in, a checked ChatRequest out, or a 400 naming the param."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from edge_proxy.sampling import SamplingParams
from veil.errors import InvalidRequest

ROLES = {"system", "developer", "user", "assistant"}
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: the matcher holds back up to this much of the reply
MAX_MESSAGES = 2048  # OpenAI's limit on 'messages'
MAX_CONTENT_PARTS = 2048  # text parts in one message's content
MAX_LOGIT_BIAS = 300  # OpenAI's limit on 'logit_bias' entries
_UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
    "function_call": "function calling", "audio": "audio output",
}


@dataclasses.dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # role + plain-text content, ready for the chat template
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(f"'{name}' must be {bound}, got {value}", name)
    return value


def _text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if len(content) > MAX_CONTENT_PARTS:
            raise _bad(f"messages[{i}].content may hold at most {MAX_CONTENT_PARTS} parts", f"messages[{i}].content")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise _bad(f"messages[{i}].content: a text part needs a 'text' string", f"messages[{i}].content")
            parts.append(text)
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    raw = body.get("messages")
    if raw is None:
        raise InvalidRequest("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array", "messages")
    if len(raw) > MAX_MESSAGES:
        raise _bad(f"'messages' may hold at most {MAX_MESSAGES} messages, got {len(raw)}", "messages")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:  # an object or array role is unhashable
            raise _bad(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}", f"messages[{i}].role")
        if role != "assistant" and msg.get("content") is None:
            raise _bad(f"messages[{i}].content is required", f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": _text(msg.get("content"), i)})
    return out


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOPS:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise _bad(f"each 'stop' string may be at most {MAX_STOP_CHARS} characters long", "stop")
    return [s for s in stop if s]


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("'logit_bias' must map token ids to numbers", "logit_bias")
    if len(raw) > MAX_LOGIT_BIAS:
        raise _bad(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries, got {len(raw)}", "logit_bias")
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad("'logit_bias' keys must be token ids", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise _bad(f"'logit_bias' token ids must be in [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise _bad("'logit_bias' values must be numbers between -100 and 100", "logit_bias")
        out[token] = float(value)
    return out


def parse_chat_request(raw: bytes, vocab_size: int) -> ChatRequest:
    try:
        body = json.loads(raw)
    except RecursionError:  # nesting deeper than the parser's stack: an error, not a crash
        raise InvalidRequest("the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model", code="missing_required_parameter")
    for key, what in _UNSUPPORTED.items():
        if body.get(key):
            raise InvalidRequest(f"{what} ('{key}') is not supported by this model", param=key, code="unsupported_parameter")
    if _int(body, "n", 1, 1) not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise InvalidRequest("'logprobs' is not supported yet", param="logprobs", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise InvalidRequest("only response_format {'type': 'text'} is supported", param="response_format",
                             code="unsupported_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=None if seed is None else seed % (2**63),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, vocab_size),
    )
    return ChatRequest(
        model=model,
        messages=_messages(body),
        sampling=sampling,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage", False)),
        stop=_stop(body),
        max_tokens=max_tokens,
    )
