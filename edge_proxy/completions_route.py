"""`POST /v1/completions`, OpenAI's legacy endpoint: admitted like chat, each prompt prepared and then run in turn
on the request's one core session, answered as one text_completion object or an SSE stream of them.

Choice `prompt_index * n + j` is prompt `prompt_index`'s j-th choice. Whatever way the request ends, `settle`
runs once: the admission is released at the tokens really used, the request counted and logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from typing import Any, AsyncGenerator, AsyncIterator

import anyio
from litestar import Request, Response, post
from litestar.openapi.spec import RequestBody
from litestar.openapi.spec.media_type import OpenAPIMediaType
from litestar.openapi.spec.response import OpenAPIResponse
from litestar.response import Stream

from admin.ratelimit import rate_limit_headers
from edge_proxy import completions as legacy
from edge_proxy import openai_shapes as shapes
from edge_proxy import sse
from edge_proxy.gatekeeper import Admission
from edge_proxy.generation import Generation
from edge_proxy.openapi_chat import (
    _COMMON,
    _FINISH,
    _INT_OR_NULL,
    _NUMBER_OR_NULL,
    _USAGE,
    CHAT_ERRORS,
    CHAT_REQUEST,
    SSE_EVENT,
)
from edge_proxy.prepare import prepare
from edge_proxy.respond import prepend, settle
from edge_proxy.routing import EdgeState, admitted, check_model
from edge_proxy.schemas import MAX_N
from veil.errors import VeilError
from veil.openapi import ERROR, DocumentedOperation


class CompletionResponder:
    def __init__(self, state: EdgeState, admission: Admission, req: legacy.CompletionRequest,
                 groups: list[list[Generation]], ids: shapes.ChatIds, headers: dict[str, str]):
        self.state, self.admission, self.req, self.groups, self.ids, self.headers = \
            state, admission, req, groups, ids, headers
        token_bytes = state.model.grammars.token_bytes
        self.choices = [legacy.CompletionChoice(p * req.chat.n + j, g, gens[0], req.prompts[p], req.echo, token_bytes)
                        for p, gens in enumerate(groups) for j, g in enumerate(gens)]
        self._open = -1  # the choice the stream is in

    async def respond(self) -> Response[Any]:
        return await (self._stream() if self.req.chat.stream else self._json())

    async def _events(self) -> AsyncGenerator[tuple[int, str | None], None]:
        """Every prompt's (choice index, text delta or None at its end), one prompt after another."""
        for p, gens in enumerate(self.groups):
            events = self.state.engine.run_choices(gens)
            try:
                async for j, text in events:
                    yield p * self.req.chat.n + j, text
            finally:  # closed at once, not when collected: its core session is closed on the way out
                with anyio.CancelScope(shield=True):
                    await events.aclose()  # type: ignore[attr-defined]

    async def _settle(self, status: str) -> None:
        await settle(self.state.gate, self.state.metrics, self.admission, self.groups, status, "completions",
                            self.req.chat.stream)

    async def _json(self) -> Response[Any]:
        status = "error"
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for index, text in events:
                    if text is not None:
                        self.choices[index].text += text
            status = "200"
        except VeilError as exc:
            status = str(exc.status_code)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle(status)
        body = legacy.completion_object(self.ids, [c.choice() for c in self.choices], self.groups)
        return Response(body, headers=self.headers)

    async def _stream(self) -> Response[Any]:
        # The first chunk needs the prefill: a dead core is an error status rather than a broken stream. A started
        # generator's `finally` runs even if the stream is never sent (it is closed when dropped).
        events = self._sse()
        head = await anext(events)
        return Stream(prepend(head, events), media_type="text/event-stream", headers={**self.headers, **sse.HEADERS})

    def _chunk(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None) -> bytes:
        return sse.event(legacy.chunk(self.ids, index, text, logprobs, finish, self.req.chat.include_usage))

    def _chunks(self, index: int, text: str | None) -> list[bytes]:
        choice, out = self.choices[index], []
        if index != self._open:  # a choice opens with its echoed prompt
            self._open = index
            if self.req.echo:
                out.append(self._chunk(index, *choice.echoed()))
        if text is None:
            out.append(self._chunk(index, "", choice.new_logprobs(), choice.gen.finish_reason))
        else:
            choice.text += text
            out.append(self._chunk(index, text, choice.new_logprobs()))
        return out

    async def _sse(self) -> AsyncIterator[bytes]:
        status, sent = "200", False
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for index, text in events:
                    for chunk in self._chunks(index, text):
                        sent = True
                        yield chunk
            if self.req.chat.include_usage:
                yield sse.event(legacy.usage_chunk(self.ids, self.groups))
        except VeilError as exc:
            status = str(exc.status_code)
            if not sent:
                raise  # nothing went out yet: the client gets an error status
            yield sse.error_event(exc)
        except BaseException:
            status = "disconnected"  # client went away (cancellation) or the server is stopping
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle(status)
        yield sse.DONE


async def _complete(request: Request[Any, Any, EdgeState], state: EdgeState, admission: Admission, rid: str,
                    started: float) -> Response[Any]:
    # parse off the event loop: the body may be megabytes of JSON, and token-id prompts are decoded
    body = await request.body()
    req = await anyio.to_thread.run_sync(legacy.parse_completion_request, body, state.model.vocab_size,
                                         state.model.tokenizer)
    check_model(state, req.chat.model)
    await state.engine.connect()
    # every prompt is checked and budgeted before any runs; then the worst case of them all is reserved at once
    groups = [await prepare(state.gate, state.engine, state.model, state.settings.privacy, admission.principal,
                            req.chat, rid, started, raw_prompt=text, prompt_logprobs=req.prompt_logprobs)
              for text in req.prompts]
    await state.gate.reserve(admission, sum(g[0].prompt_tokens + sum(c.max_new_tokens for c in g) for g in groups), rid)
    ids = shapes.ChatIds(f"cmpl-{secrets.token_hex(12)}", req.chat.model, f"fp_veil_{state.model.spec.bundle_id[:8]}")
    headers = {"x-request-id": rid, **rate_limit_headers(admission.decision)}
    return await CompletionResponder(state, admission, req, groups, ids, headers).respond()


# --- the OpenAPI operation: the same fields, bounds and statuses as chat where they are the same ----------------

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0},
              "description": "token ids, taken only as the tokenizer encodes their text"}
_PROMPTS = {"type": "array", "minItems": 1, "maxItems": legacy.MAX_PROMPTS}
_SHARED = ("model", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stream", "stream_options",
           "stop", "logit_bias", "user")

COMPLETION_REQUEST: dict[str, Any] = {
    "title": "CompletionRequest",
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **{k: CHAT_REQUEST["properties"][k] for k in _SHARED},
        "prompt": {"anyOf": [{"type": "string", "minLength": 1}, {**_PROMPTS, "items": {"type": "string", "minLength": 1}},
                             _TOKEN_IDS, {**_PROMPTS, "items": _TOKEN_IDS}],
                   "description": "tokenized as it is, with no chat template"},
        "max_tokens": {"type": _INT_OR_NULL, "minimum": 1, "default": legacy.DEFAULT_MAX_TOKENS,
                       "description": "new tokens at most per choice; prompt + max_tokens must fit the context (else 400)"},
        "n": {"type": _INT_OR_NULL, "minimum": 1, "maximum": MAX_N, "description": "choices per prompt"},
        "best_of": {"type": _INT_OR_NULL, "minimum": 1, "maximum": MAX_N, "description": "only null or equal to n"},
        "echo": {"type": ["boolean", "null"], "description": "the text opens with the prompt"},
        "logprobs": {"type": _INT_OR_NULL, "minimum": 0, "maximum": legacy.MAX_LOGPROBS,
                     "description": "each token's log-probability and this many alternatives (with echo, the prompt's too)"},
        "suffix": {"type": "null", "description": "not supported"},
    },
}

_LOGPROBS = {"anyOf": [{"type": "null"}, {
    "type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": _NUMBER_OR_NULL}},
        "top_logprobs": {"type": "array", "items": {"type": ["object", "null"], "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    }}]}


def _choice(finish: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": _LOGPROBS,
                           "finish_reason": finish}}


COMPLETION: dict[str, Any] = {
    "title": "Completion",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {**_COMMON, "object": {"const": "text_completion"},
                   "choices": {"type": "array", "minItems": 1, "items": _choice(_FINISH)}, "usage": _USAGE},
}

COMPLETION_CHUNK: dict[str, Any] = {
    "title": "CompletionChunk",
    "description": "one `data:` line of the event stream; the stream ends with `data: [DONE]`",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {**_COMMON, "object": {"const": "text_completion"},
                   "choices": {"type": "array", "maxItems": 1, "items": _choice({"anyOf": [_FINISH, {"type": "null"}]})},
                   "usage": {"anyOf": [_USAGE, {"type": "null"}]}},
}

# chat's event, carrying these chunks
SSE_COMPLETION_EVENT: dict[str, Any] = {
    **SSE_EVENT, "title": "CompletionStreamEvent",
    "properties": {**SSE_EVENT["properties"], "data": {**SSE_EVENT["properties"]["data"],
                                                       "contentSchema": {"anyOf": [COMPLETION_CHUNK, ERROR]}}},
}


@dataclasses.dataclass
class CompletionOperation(DocumentedOperation):
    """The route's operation: chat's error statuses, its request body and its 200 (an object or an event stream)."""

    errors = CHAT_ERRORS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(
            required=True, content={"application/json": OpenAPIMediaType(schema=COMPLETION_REQUEST)})  # type: ignore[arg-type]
        ok = OpenAPIResponse(description="the completion, or (stream: true) a server-sent event stream of chunks",
                             content={"application/json": OpenAPIMediaType(schema=COMPLETION),  # type: ignore[arg-type]
                                      "text/event-stream": OpenAPIMediaType(schema=SSE_COMPLETION_EVENT)})  # type: ignore[arg-type]
        self.responses = {**(self.responses or {}), "200": ok}


@post("/v1/completions", status_code=200, operation_class=CompletionOperation,
      summary="Create a completion (OpenAI's legacy endpoint)")
async def completions(request: Request[Any, Any, EdgeState], state: EdgeState) -> Response[Any]:
    return await admitted(request, state, lambda admission, rid, started: _complete(request, state, admission, rid,
                                                                                      started))
