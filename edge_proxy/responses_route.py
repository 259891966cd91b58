"""POST /v1/responses: the OpenAI Responses API over chat's pipeline, stateless, and its OpenAPI operation.

The request becomes a ChatRequest (edge_proxy/responses.py); admission, policy, template, generation and the
release of the admission are chat's (routing.admitted, prepare, respond.ChatResponder); only the answer's shape
differs: a Response object, or Responses events (`event:` + `data:`, no `[DONE]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator

import anyio
from litestar import Request, Response, post
from litestar.openapi.spec import RequestBody
from litestar.openapi.spec.media_type import OpenAPIMediaType
from litestar.openapi.spec.response import OpenAPIResponse

from admin.ratelimit import rate_limit_headers
from edge_proxy import openai_shapes as shapes
from edge_proxy import responses as shape
from edge_proxy.gatekeeper import Admission
from edge_proxy.openapi_chat import _INT_OR_NULL, CHAT_ERRORS, _bounded
from edge_proxy.prepare import prepare
from edge_proxy.respond import ChatResponder, chain
from edge_proxy.routing import EdgeState, admitted, check_model
from edge_proxy.schemas import MAX_CONTENT_PARTS, MAX_MESSAGES
from veil.errors import VeilError
from veil.openapi import DocumentedOperation

# --- the OpenAPI document -------------------------------------------------------------------------------

_STRING_OR_NULL = {"type": ["string", "null"]}
_NOT_SUPPORTED = {"description": "not supported: a 400 unsupported_parameter when set"}


def _parts(*kinds: str) -> dict[str, Any]:
    return {"type": "array", "maxItems": MAX_CONTENT_PARTS, "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"enum": list(kinds)}, "text": {"type": "string"}}}}


_ITEM = {"oneOf": [
    {"title": "message", "type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": sorted(shape.ROLES)},
        "content": {"anyOf": [{"type": "string"}, _parts("input_text", "output_text")]}}},
    {"title": "function_call", "type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "JSON text, as the model wrote it"}}},
    {"title": "function_call_output", "type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string"},
        "output": {"anyOf": [{"type": "string"}, _parts("input_text")]}}},
]}
_FUNCTION_TOOL = {
    "type": "object", "required": ["type", "name"], "description": "only function tools are supported",
    "properties": {"type": {"const": "function"}, "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                   "description": _STRING_OR_NULL, "parameters": {"type": ["object", "null"]},
                   "strict": {"type": ["boolean", "null"]}},
}
_FORMAT = {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"], "properties": {
        "type": {"const": "json_schema"}, "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}, "description": {"type": "string"}}},
]}

RESPONSES_REQUEST: dict[str, Any] = {
    "title": "ResponseCreateRequest",
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "the id from /v1/models"},
        "input": {"anyOf": [{"type": "string", "description": "one user message"},
                            {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": _ITEM}]},
        "instructions": {**_STRING_OR_NULL, "description": "a system message before the input"},
        "tools": {"type": ["array", "null"], "items": _FUNCTION_TOOL},
        "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]}, {
            "type": "object", "required": ["type", "name"],
            "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "text": {"type": ["object", "null"], "properties": {"format": _FORMAT}},
        "temperature": _bounded(0, 2, "0 = greedy"),
        "top_p": _bounded(0, 1, "nucleus sampling"),
        "max_output_tokens": {"type": _INT_OR_NULL, "minimum": 1,
                              "description": "new tokens at most; the prompt plus these must fit the context (else 400)"},
        "stream": {"type": ["boolean", "null"]},
        "store": {"type": ["boolean", "null"], "description": "accepted; nothing is stored (answered as false)"},
        "metadata": {"type": ["object", "null"], "maxProperties": shape.MAX_METADATA, "description": "repeated back",
                     "additionalProperties": {"type": "string", "maxLength": shape.MAX_METADATA_VALUE}},
        "user": {"type": "string"}, "safety_identifier": {"type": "string"},
        **{key: _NOT_SUPPORTED for key in shape.REFUSED},
    },
}

_USAGE = {"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0} for k in ("input_tokens", "output_tokens", "total_tokens")}}
_OUTPUT_ITEM = {"type": "object", "required": ["type", "id", "status"], "properties": {
    "type": {"enum": ["message", "function_call"]}, "id": {"type": "string"},
    "status": {"enum": ["in_progress", "completed", "incomplete"]}}}

RESPONSE: dict[str, Any] = {
    "title": "Response",
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output", "tools", "tool_choice",
                 "parallel_tool_calls"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "response"}, "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]}, "model": {"type": "string"},
        "output": {"type": "array", "items": _OUTPUT_ITEM},
        "incomplete_details": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "reason": {"enum": ["max_output_tokens", "content_filter"]}}}]},
        "error": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["code", "message"]}]},
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
        "store": {"const": False},
    },
}

STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.function_call_arguments.delta",
                 "response.function_call_arguments.done", "response.output_item.done", "response.completed",
                 "response.incomplete", "response.failed"]

# one server-sent event: `event` names its type, `data` is its JSON; a failure after the 200 is a
# response.failed event whose response carries the error
SSE_EVENT: dict[str, Any] = {
    "title": "ResponseStreamEvent",
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": STREAM_EVENTS},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["type", "sequence_number"],
            "properties": {"type": {"enum": STREAM_EVENTS}, "sequence_number": {"type": "integer", "minimum": 0},
                           "response": RESPONSE}}},
    },
}


# --- the route ------------------------------------------------------------------------------------------

class ResponsesResponder(ChatResponder):
    """Chat's responder (the run, the first step before a stream's 200, the admission released once) answering
    with a Response object or Responses events."""

    def __init__(self, *args: Any, echo: dict[str, Any]):
        super().__init__(*args)
        self.echo = echo

    async def _json(self) -> Response[Any]:
        await super()._json()  # runs and settles exactly as chat does; its chat.completion body goes unused
        return Response(shape.final_response(self.ids, self.echo, self.replies[0], self.gens), headers=self.headers)

    async def _sse(self, first: tuple[int, str | None] | None) -> AsyncIterator[bytes]:
        events, reply, status = shape.ResponseEvents(self.ids, self.echo), self.replies[0], "200"
        try:
            for event in events.start():
                yield event
            async for _, text in chain([] if first is None else [first], self.events):
                for event in events.deltas(reply.feed(text) if text is not None else reply.finish()):
                    yield event
            for event in events.finish(reply, self.gens):
                yield event
        except VeilError as exc:
            status = str(exc.status_code)
            yield events.failed(exc, self.gens)
        except BaseException:
            status = "disconnected"  # client went away (cancellation) or the server is stopping
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
                await self._settle(status)


@dataclasses.dataclass
class ResponsesOperation(DocumentedOperation):
    """The route's operation: chat's error statuses, its request body and its 200 (a Response, or events)."""

    errors = CHAT_ERRORS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(
            required=True, content={"application/json": OpenAPIMediaType(schema=RESPONSES_REQUEST)})  # type: ignore[arg-type]
        ok = OpenAPIResponse(description="the Response, or (stream: true) a server-sent event stream of its events",
                             content={"application/json": OpenAPIMediaType(schema=RESPONSE),  # type: ignore[arg-type]
                                      "text/event-stream": OpenAPIMediaType(schema=SSE_EVENT)})  # type: ignore[arg-type]
        self.responses = {**(self.responses or {}), "200": ok}


@post("/v1/responses", status_code=200, operation_class=ResponsesOperation,
      summary="Create a model response (OpenAI Responses API, stateless)")
async def responses(request: Request[Any, Any, EdgeState], state: EdgeState) -> Response[Any]:
    return await admitted(request, state, lambda admission, rid, started: _respond(request, state, admission, rid,
                                                                                     started))


async def _respond(request: Request[Any, Any, EdgeState], state: EdgeState, admission: Admission, rid: str,
                   started: float) -> Response[Any]:
    # parse off the event loop: the body may be megabytes of JSON
    parsed = await anyio.to_thread.run_sync(shape.parse_responses_request, await request.body())
    chat = parsed.chat
    check_model(state, chat.model)
    await state.engine.connect()
    gens = await prepare(state.gate, state.engine, state.model, state.settings.privacy, admission.principal, chat,
                         rid, started)
    await state.gate.reserve(admission, gens[0].prompt_tokens + gens[0].max_new_tokens, rid)
    # from here the responder releases the admission however the request ends
    ids = shapes.ChatIds(shape.new_id("resp"), chat.model, f"fp_veil_{state.model.spec.bundle_id[:8]}")
    headers = {"x-request-id": rid, **rate_limit_headers(admission.decision)}
    return await ResponsesResponder(state.engine, state.gate, state.metrics, admission, chat, gens, ids, headers,
                                    echo=parsed.echo).respond()
