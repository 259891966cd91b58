"""Run a prepared Generation and answer it: one chat.completion object, or an SSE stream of chunks.

Whatever way a request ends (done, refused by the core, client gone), `_settle` runs once: the
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
from edge_proxy.schemas import ChatRequest
from veil.errors import VeilError

log = logging.getLogger("veil.edge")


class ChatResponder:
    def __init__(self, engine: Engine, gate: Gatekeeper, metrics: EdgeMetrics, admission: Admission,
                 chat: ChatRequest, gen: Generation, ids: shapes.ChatIds, headers: dict[str, str]):
        self.gate, self.metrics, self.admission, self.principal = gate, metrics, admission, admission.principal
        self.chat, self.gen, self.ids, self.headers = chat, gen, ids, headers
        self.deltas = engine.run(gen)
        self._settled = False

    async def respond(self) -> Response[Any]:
        return await (self._stream() if self.chat.stream else self._json())

    async def _json(self) -> Response[Any]:
        status = "error"
        try:
            text = "".join([piece async for piece in self.deltas])
            status = "200"
        except VeilError as exc:
            status = str(exc.status_code)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle(status)
        return Response(shapes.completion_object(self.ids, text, self.gen), headers=self.headers)

    async def _stream(self) -> Response[Any]:
        # Run the prefill before answering 200, so a dead core is an error status rather than a broken stream.
        try:
            first = await anext(self.deltas, None)
        except VeilError as exc:
            await self._settle(str(exc.status_code))
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._settle("disconnected")
            raise
        # Start the event generator here: a started generator's `finally` runs even if the stream is never
        # sent (it is closed when dropped), so the admission is released whatever happens to the response.
        events = self._events(first)
        head = await anext(events)
        return Stream(_prepend(head, events), media_type="text/event-stream", headers={**self.headers, **sse.HEADERS})

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return sse.event(shapes.chunk(self.ids, delta, finish_reason, self.chat.include_usage))

    async def _events(self, first: str | None) -> AsyncIterator[bytes]:
        status = "200"
        try:
            yield self._chunk({"role": "assistant", "content": "", "refusal": None})
            if first is not None:
                yield self._chunk({"content": first})
                async for piece in self.deltas:
                    yield self._chunk({"content": piece})
            yield self._chunk({}, self.gen.finish_reason)
            if self.chat.include_usage:
                yield sse.event(shapes.usage_chunk(self.ids, self.gen))
        except VeilError as exc:
            status = str(exc.status_code)
            yield sse.error_event(exc)
        except BaseException:
            status = "disconnected"  # client went away (cancellation) or the server is stopping
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.deltas.aclose()  # type: ignore[attr-defined]
                await self._settle(status)
        yield sse.DONE

    async def _settle(self, status: str) -> None:
        if self._settled:
            return
        self._settled = True
        gen, m = self.gen, self.metrics
        await self.gate.release(self.admission, gen.total_tokens)
        if gen.blocked_rule is not None:
            self.gate.blocked(self.principal, gen.blocked_rule, gen.request_id, "output")
        if gen.restorer is not None:
            m.placeholders.labels(outcome="restored").inc(gen.restorer.restored)
            m.placeholders.labels(outcome="mangled").inc(gen.restorer.mangled)
        m.requests.labels(status=status).inc()
        m.prompt_tokens.inc(gen.prompt_tokens)
        m.completion_tokens.inc(gen.completion_tokens)
        ttft, elapsed = gen.ttft_seconds(), gen.elapsed_seconds()
        if ttft is not None:
            m.ttft.observe(ttft)
        log.info("chat rid=%s status=%s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s "
                 "ttft_ms=%.1f total_ms=%.1f", gen.request_id, status, self.chat.stream, gen.prompt_tokens,
                 gen.completion_tokens, gen.finish_reason, (ttft if ttft is not None else elapsed) * 1000,
                 elapsed * 1000)


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    try:
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
