"""Run a prepared Generation and answer it: one chat.completion object, or an SSE stream of chunks.

Whatever way a request ends (done, refused by the core, client gone), `settle` runs once: the
admission is released (its core session freed, its tokens corrected to the real usage), metrics and the
log line written.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import anyio
from litestar import Response
from litestar.response import Stream

from edge_proxy import openai_shapes as shapes
from edge_proxy import sse
from edge_proxy.gatekeeper import Admission, Gatekeeper
from edge_proxy.generate import Engine
from edge_proxy.generation import Generation
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.reply import ChoiceReply
from edge_proxy.schemas import ChatRequest
from veil.errors import VeilError

log = logging.getLogger("veil.edge")


class ChatResponder:
    def __init__(self, engine: Engine, gate: Gatekeeper, metrics: EdgeMetrics, admission: Admission,
                 chat: ChatRequest, gens: list[Generation], ids: shapes.ChatIds, headers: dict[str, str]):
        self.gate, self.metrics, self.admission, self.principal = gate, metrics, admission, admission.principal
        self.chat, self.gens, self.ids, self.headers = chat, gens, ids, headers
        token_bytes = engine.model.grammars.token_bytes
        self.replies = [ChoiceReply(i, g, chat.tools, token_bytes) for i, g in enumerate(gens)]
        self.events = engine.run_choices(gens)

    async def respond(self) -> Response[Any]:
        return await (self._stream() if self.chat.stream else self._json())

    async def _json(self) -> Response[Any]:
        status = "error"
        try:
            async for index, text in self.events:
                if text is not None:
                    self.replies[index].feed(text)
            status = "200"
        except VeilError as exc:
            status = str(exc.status_code)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle(status)
        body = shapes.completion_object(self.ids, [r.message() for r in self.replies], self.gens)
        return Response(body, headers=self.headers)

    async def _stream(self) -> Response[Any]:
        # Run the prefill before answering 200, so a dead core is an error status rather than a broken stream.
        try:
            first = await anext(self.events, None)
        except VeilError as exc:
            await self._settle(str(exc.status_code))
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._settle("disconnected")
            raise
        # Start the event generator here: a started generator's `finally` runs even if the stream is never
        # sent (it is closed when dropped), so the admission is released whatever happens to the response.
        events = self._sse(first)
        head = await anext(events)
        return Stream(prepend(head, events), media_type="text/event-stream", headers={**self.headers, **sse.HEADERS})

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> bytes:
        return sse.event(shapes.chunk(self.ids, index, delta, finish_reason, self.chat.include_usage, logprobs))

    def _deltas(self, reply: ChoiceReply, deltas: list[dict[str, Any]]) -> list[bytes]:
        """Chunks for a choice's deltas; the log-probabilities of the tokens behind them go with the first."""
        logprobs = reply.new_logprobs() if deltas else None
        return [self._chunk(reply.index, d, logprobs=logprobs if i == 0 else None) for i, d in enumerate(deltas)]

    async def _sse(self, first: tuple[int, str | None] | None) -> AsyncIterator[bytes]:
        status, started = "200", -1
        try:
            pending = [] if first is None else [first]
            async for event in chain(pending, self.events):
                index, text = event
                reply = self.replies[index]
                if index != started:  # each choice opens with its role
                    started = index
                    yield self._chunk(index, {"role": "assistant", "content": "", "refusal": None})
                if text is not None:
                    for chunk in self._deltas(reply, reply.feed(text)):
                        yield chunk
                    continue
                for chunk in self._deltas(reply, reply.finish()):
                    yield chunk
                yield self._chunk(index, {}, reply.finish_reason, reply.new_logprobs())
            if self.chat.include_usage:
                yield sse.event(shapes.usage_chunk(self.ids, self.gens))
        except VeilError as exc:
            status = str(exc.status_code)
            yield sse.error_event(exc)
        except BaseException:
            status = "disconnected"  # client went away (cancellation) or the server is stopping
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
                await self._settle(status)
        yield sse.DONE

    async def _settle(self, status: str) -> None:
        await settle(self.gate, self.metrics, self.admission, [self.gens], status, "chat", self.chat.stream)

async def chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    try:
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def settle(gate: Gatekeeper, metrics: EdgeMetrics, admission: Admission, groups: list[list[Generation]],
                 status: str, route: str, stream: bool) -> None:
    """Release the admission at the tokens really used, then count and log the request; once, however it ended."""
    if admission.released:
        return
    used, gens, m = shapes.group_usage(groups), [g for gens in groups for g in gens], metrics
    await gate.release(admission, used["total_tokens"])
    gate.plane.usage.count(admission.principal.key_id, requests=1, prompt_tokens=used["prompt_tokens"],
                           completion_tokens=used["completion_tokens"])
    for g in gens:
        if g.blocked_rule is not None:
            gate.blocked(admission.principal, g.blocked_rule, g.request_id, "output")
        if g.restorer is not None:
            m.placeholders.labels(outcome="restored").inc(g.restorer.restored)
            m.placeholders.labels(outcome="mangled").inc(g.restorer.mangled)
    m.requests.labels(status=status).inc()
    m.prompt_tokens.inc(used["prompt_tokens"])
    m.completion_tokens.inc(used["completion_tokens"])
    ttft, elapsed = gens[0].ttft_seconds(), max(g.elapsed_seconds() for g in gens)
    if ttft is not None:
        m.ttft.observe(ttft)
    log.info("%s rid=%s status=%s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft_ms=%.1f "
             "total_ms=%.1f", route, gens[0].request_id, status, stream, used["prompt_tokens"],
             used["completion_tokens"], gens[0].finish_reason, (ttft if ttft is not None else elapsed) * 1000,
             elapsed * 1000)
