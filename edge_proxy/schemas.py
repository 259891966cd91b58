"""OpenAI chat-completion request parsing: raw JSON in, a checked ChatRequest out, or a 400 naming the param."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from edge_proxy.logprobs import MAX_TOP_LOGPROBS
from edge_proxy.sampling import SamplingParams
from edge_proxy.tools import ToolSpec, assistant_text, fold_tool_messages, parse_tools
from veil.errors import InvalidRequest

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: the matcher holds back up to this much of the reply
MAX_MESSAGES = 2048  # OpenAI's limit on 'messages'
MAX_CONTENT_PARTS = 2048  # text parts in one message's content
MAX_LOGIT_BIAS = 300  # OpenAI's limit on 'logit_bias' entries
MAX_N = 16  # choices per request: generated one after another on the request's core session
_UNSUPPORTED = {"functions": "function calling (use 'tools')", "function_call": "function calling (use 'tool_choice')",
                "audio": "audio output"}


@dataclasses.dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # role + plain-text content, ready for the chat template
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: off; else how many alternatives per token (top_logprobs)
    output_schema: dict[str, Any] | None = None  # response_format: the JSON schema the reply must match
    tools: ToolSpec | None = None  # None when no tool may be called


def _schema(fmt: dict[str, Any]) -> dict[str, Any]:
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format of type json_schema needs a 'json_schema' object", "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise _bad("response_format.json_schema.name must be a string of 1-64 characters",
                   "response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema must be a JSON schema object", "response_format.json_schema.schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
    return schema


def output_schema(fmt: Any, param: str = "response_format") -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the reply to follow; None for plain text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        return _schema(fmt)
    raise _bad(f"'{param}' must be of type text, json_object or json_schema", param)


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
        content = _text(msg.get("content"), i)
        if role == "assistant" and msg.get("tool_calls"):
            content = assistant_text(content, _tool_calls(msg["tool_calls"], i))
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return fold_tool_messages(out)


def _tool_calls(raw: Any, i: int) -> list[tuple[str, str]]:
    """An assistant turn's earlier tool calls: (name, arguments) each, the arguments as the model wrote them."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(raw, list) or len(raw) > MAX_MESSAGES:
        raise _bad(f"{param} must be an array of tool calls", param)
    calls = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        name, args = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(args, str):
            raise _bad(f"{param}: each call needs function.name and function.arguments strings", param)
        calls.append((name, args))
    return calls


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


def load_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 (never a crash, however deep or broken it is)."""
    try:
        body = json.loads(raw)
    except RecursionError:  # nesting deeper than the parser's stack: an error, not a crash
        raise InvalidRequest("the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def stream_param(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of any generation request."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, bool((options or {}).get("include_usage", False))


def sampling_param(body: dict[str, Any], vocab_size: int) -> SamplingParams:
    """The sampling fields chat and legacy completions share."""
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=None if seed is None else seed % (2**63),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, vocab_size),
    )


def parse_chat_request(raw: bytes, vocab_size: int) -> ChatRequest:
    body = load_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model", code="missing_required_parameter")
    for key, what in _UNSUPPORTED.items():
        if body.get(key):
            raise InvalidRequest(f"{what} ('{key}') is not supported by this model", param=key, code="unsupported_parameter")
    n = _int(body, "n", 1, MAX_N) or 1
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    stream, include_usage = stream_param(body)
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    return ChatRequest(
        model=model,
        messages=_messages(body),
        sampling=sampling_param(body, vocab_size),
        stream=stream,
        include_usage=include_usage,
        stop=_stop(body),
        max_tokens=max_tokens,
        n=n,
        logprobs=(top or 0) if logprobs else None,
        output_schema=output_schema(body.get("response_format")),
        tools=parse_tools(body),
    )


# the field parsers under public names, for the other request parsers (legacy completions: edge_proxy/completions.py)
invalid_value = _bad
number_param = _number
int_param = _int
stop_param = _stop
