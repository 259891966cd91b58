"""The chat-completions operation in the OpenAPI document: the request and response schemas, with their bounds.

The route parses its body by hand (edge_proxy/schemas.py) so every fault gets OpenAI's error shape and the
param it concerns; these schemas describe the same contract for SDK generators and fuzzers, built from the
same constants; the fuzz campaign (tests/fuzz) sends requests drawn from them and checks every answer against
the documented statuses and bodies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar.openapi.spec import RequestBody
from litestar.openapi.spec.media_type import OpenAPIMediaType
from litestar.openapi.spec.response import OpenAPIResponse

from edge_proxy.logprobs import MAX_TOP_LOGPROBS
from edge_proxy.schemas import MAX_CONTENT_PARTS, MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_N, MAX_STOP_CHARS, MAX_STOPS
from edge_proxy.tools import MAX_TOOLS
from veil.openapi import ERROR, DocumentedOperation

_NUMBER_OR_NULL = ["number", "null"]
_INT_OR_NULL = ["integer", "null"]


def _bounded(low: float, high: float, about: str) -> dict[str, Any]:
    return {"type": _NUMBER_OR_NULL, "minimum": low, "maximum": high, "description": about}


_TEXT_PART = {
    "type": "object", "required": ["type", "text"], "additionalProperties": False,
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_REFUSAL_PART = {
    "type": "object", "required": ["type", "refusal"], "additionalProperties": False,
    "properties": {"type": {"const": "refusal"}, "refusal": {"type": "string"}},
}
_CONTENT_PARTS = {"type": "array", "maxItems": MAX_CONTENT_PARTS, "items": {"oneOf": [_TEXT_PART, _REFUSAL_PART]}}


def _message(roles: list[str], content_required: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"anyOf": [{"type": "string"}, _CONTENT_PARTS] + ([] if content_required
                                                                               else [{"type": "null"}])}
    return {
        "type": "object",
        "required": ["role", "content"] if content_required else ["role"],
        "properties": {"role": {"enum": roles}, "content": content, "name": {"type": "string"}},
    }


_FORMAT_PLAIN = {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}}
_FORMAT_SCHEMA = {
    "type": "object", "required": ["type", "json_schema"], "description": "the reply is JSON valid under the schema",
    "properties": {"type": {"const": "json_schema"}, "json_schema": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64}, "description": {"type": "string"},
                       "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}}}},
}
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _FUNCTION_NAME, "description": {"type": "string"}, "parameters": {"type": "object"},
        "strict": {"type": ["boolean", "null"]}}}}}
_NAMED_CHOICE = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                "properties": {"name": _FUNCTION_NAME}}}}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
_TOKEN_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
    "token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": "array", "items": {"type": "integer"}},
    "top_logprobs": {"type": "array", "items": {"type": "object"}}}}
_LOGPROBS = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
    "content": {"type": ["array", "null"], "items": _TOKEN_LOGPROB}, "refusal": {"type": "null"}}}]}
_TOOL_MESSAGE = {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
    "role": {"const": "tool"}, "tool_call_id": {"type": "string"},
    "content": {"anyOf": [{"type": "string"}, _CONTENT_PARTS]}}}

_ASSISTANT = {**_message(["assistant"], False)}
_ASSISTANT["properties"] = {**_ASSISTANT["properties"], "tool_calls": {"type": ["array", "null"], "items": _TOOL_CALL}}


CHAT_REQUEST: dict[str, Any] = {
    "title": "ChatCompletionRequest",
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "the id from /v1/models"},
        "messages": {
            "type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
            "items": {"anyOf": [_message(["system", "developer", "user"], True), _ASSISTANT, _TOOL_MESSAGE]},
        },
        "temperature": _bounded(0, 2, "0 = greedy"),
        "top_p": _bounded(0, 1, "nucleus sampling"),
        "presence_penalty": _bounded(-2, 2, "OpenAI's presence penalty"),
        "frequency_penalty": _bounded(-2, 2, "OpenAI's frequency penalty"),
        "seed": {"type": _INT_OR_NULL, "minimum": -(2**63), "maximum": 2**63 - 1,
                 "description": "the same seed and parameters give the same sampled reply"},
        "max_tokens": {"type": _INT_OR_NULL, "minimum": 1,
                       "description": "new tokens at most; prompt + max_tokens must fit the context (else 400)"},
        "max_completion_tokens": {"type": _INT_OR_NULL, "minimum": 1, "description": "takes precedence over max_tokens"},
        "n": {"type": _INT_OR_NULL, "minimum": 1, "maximum": MAX_N,
              "description": "choices, generated one after another from one prefill of the prompt"},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {
            "type": ["object", "null"], "description": "only with stream: true",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "stop": {"anyOf": [
            {"type": "string", "maxLength": MAX_STOP_CHARS},
            {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}},
            {"type": "null"},
        ]},
        "logit_bias": {
            "type": ["object", "null"], "maxProperties": MAX_LOGIT_BIAS,
            "description": "token id (a decimal string below the vocabulary size) to a bias",
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        "logprobs": {"type": ["boolean", "null"], "description": "log-softmax of the model's own logits"},
        "top_logprobs": {"type": _INT_OR_NULL, "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                         "description": "alternatives per token; needs logprobs"},
        "response_format": {"anyOf": [{"type": "null"}, _FORMAT_PLAIN, _FORMAT_SCHEMA]},
        "tools": {"type": ["array", "null"], "minItems": 1, "maxItems": MAX_TOOLS, "items": _TOOL},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required", None]}, _NAMED_CHOICE]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "user": {"type": "string"},
    },
}

_USAGE = {
    "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_FINISH = {"enum": ["stop", "length", "content_filter", "tool_calls"]}
_COMMON = {
    "id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
    "system_fingerprint": {"type": "string"},
}

CHAT_COMPLETION: dict[str, Any] = {
    "title": "ChatCompletion",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_COMMON,
        "object": {"const": "chat.completion"},
        "choices": {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                    "refusal": {"type": "null"}, "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
                "logprobs": _LOGPROBS,
                "finish_reason": _FINISH,
            }}},
        "usage": _USAGE,
    },
}

CHAT_CHUNK: dict[str, Any] = {
    "title": "ChatCompletionChunk",
    "description": "one `data:` line of the event stream; the stream ends with `data: [DONE]`",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **_COMMON,
        "object": {"const": "chat.completion.chunk"},
        "choices": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "required": ["index", "delta", "finish_reason"],
            "properties": {"index": {"type": "integer"},
                           "delta": {"type": "object", "properties": {
                               "role": {"const": "assistant"}, "content": {"type": "string"},
                               "tool_calls": {"type": "array", "items": {"type": "object", "required": ["index"]}}}},
                           "logprobs": _LOGPROBS,
                           "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]}}}},
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
    },
}

# one server-sent event, as OpenAPI 3.2 describes a stream's items: its `data` is a chunk or an error object
# as JSON, or the final `[DONE]`, which is not JSON; so `contentSchema` annotates the JSON ones and no
# `contentMediaType` asks a validator to parse every event
SSE_EVENT: dict[str, Any] = {
    "title": "ChatCompletionStreamEvent",
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a chunk or an error object as JSON, or [DONE]",
                 "contentSchema": {"anyOf": [CHAT_CHUNK, ERROR]}},
        "event": {"type": "string"},
    },
}

# every status the route answers besides 200, as OpenAI names them
CHAT_ERRORS = {
    400: "malformed JSON, a parameter out of range, over the context length, or blocked by a guardrail",
    401: "no, or a wrong, API key", 403: "the key lacks the generate scope", 404: "unknown model",
    413: "the body is over edge.max_request_bytes",
    429: "over the key's rpm, tpm or concurrent-request limit (Retry-After, x-ratelimit-* headers)",
    502: "the core answered something invalid",
    503: "the core, Redis, the policy store or a free core session is unavailable",
    504: "the core did not answer in time",
}


@dataclasses.dataclass
class ChatOperation(DocumentedOperation):
    """The route's operation: the error statuses as every route documents them, plus its real request body
    and its 200 (a completion, or an event stream)."""

    errors = CHAT_ERRORS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(
            required=True, content={"application/json": OpenAPIMediaType(schema=CHAT_REQUEST)})  # type: ignore[arg-type]
        ok = OpenAPIResponse(description="the completion, or (stream: true) a server-sent event stream of chunks",
                             content={"application/json": OpenAPIMediaType(schema=CHAT_COMPLETION),  # type: ignore[arg-type]
                                      "text/event-stream": OpenAPIMediaType(schema=SSE_EVENT)})  # type: ignore[arg-type]
        self.responses = {**(self.responses or {}), "200": ok}
