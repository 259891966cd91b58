"""One request's generation loop: embed -> core step -> LM head -> sample -> detokenize -> stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import AsyncIterator

import anyio
import torch

from edge_proxy.core_client import CoreTransport
from edge_proxy.detokenize import IncrementalDetokenizer, StopMatcher
from edge_proxy.edge_model import EdgeModel
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.outgoing import NoiseSpec, OutgoingStates, SpanNoise
from edge_proxy.sampling import Sampler, SamplingParams
from edge_proxy.spans.restore import PlaceholderRestorer
from veil.errors import ContextLengthExceeded, NotFound
from veil.wire import StepRequest

log = logging.getLogger("veil.edge.generate")


@dataclasses.dataclass(slots=True)
class Completion:
    """Counters of one generation; filled in as it runs."""

    prompt_tokens: int
    max_new_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)  # every sampled token, EOS included
    first_token_at: float | None = None


class Engine:
    """Generates for many requests at once; each request holds its own core session."""

    def __init__(self, model: EdgeModel, core: CoreTransport, context_limit: int, metrics: EdgeMetrics,
                 default_max_tokens: int = 0):
        self.model, self.core, self.metrics = model, core, metrics
        self.context_limit = context_limit
        self.default_max_tokens = default_max_tokens

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """New tokens allowed for this prompt, or a 400 naming the limit."""
        limit = self.context_limit
        if prompt_tokens >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens, but the messages resulted in "
                f"{prompt_tokens} tokens. Shorten the messages.", param="messages")
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens; the messages use {prompt_tokens} tokens "
                f"and max_tokens asks for {max_tokens}. Lower max_tokens or shorten the messages.",
                param="max_tokens")
        room = limit - prompt_tokens
        if max_tokens is None and self.default_max_tokens > 0:
            return min(room, self.default_max_tokens)
        return max_tokens if max_tokens is not None else room

    async def _step(self, outgoing: OutgoingStates, session: str, offset: int, pending: list[int],
                    history: list[int], rid: str) -> torch.Tensor:
        started = time.perf_counter()
        # edge-held blocks are real compute: keep them off the event loop
        states = outgoing(pending, offset) if self.model.edge_stack is None else \
            await asyncio.to_thread(outgoing, pending, offset)
        try:
            result = await self.core.step(StepRequest(session, offset, states, request_id=rid))
        except NotFound as exc:
            if exc.code != "session_not_found" or offset == 0:
                raise
            # The core lost the session (idle expiry, restart): the edge has the history, so re-prefill.
            log.warning("core session lost; re-prefilling rid=%s tokens=%d", rid, len(history))
            states = await asyncio.to_thread(outgoing, history, 0)
            result = await self.core.step(StepRequest(session, 0, states, request_id=rid))
        self.metrics.step_roundtrip.observe(time.perf_counter() - started)
        self.metrics.core_compute.observe(result.compute_ms / 1000)
        return result.hidden[-1]

    def _next_token(self, hidden: torch.Tensor, sampler: Sampler) -> int:
        started = time.perf_counter()
        token = sampler.sample(self.model.logits(hidden))
        self.metrics.head.observe(time.perf_counter() - started)
        return token

    async def run(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], done: Completion,
                  rid: str, noise: NoiseSpec = NoiseSpec(), span_noise: SpanNoise | None = None,
                  restorer: PlaceholderRestorer | None = None) -> AsyncIterator[str]:
        """Yield text deltas; `done` holds counts and the finish reason once the iterator ends.

        Text goes detokenizer -> placeholder restorer -> stop matcher, so stop strings and
        what the client sees are both about the restored text.
        """
        session = secrets.token_hex(16)
        outgoing = OutgoingStates(self.model, noise, span_noise=span_noise)
        sampler = Sampler(params, self.model.vocab_size)
        detok = IncrementalDetokenizer(self.model.tokenizer, prompt_ids)
        stop = StopMatcher(stops)
        restore = (lambda text: text) if restorer is None else restorer.feed
        history, pending, offset = list(prompt_ids), list(prompt_ids), 0
        try:
            while True:
                hidden = await self._step(outgoing, session, offset, pending, history, rid)
                offset += len(pending)
                token = await asyncio.to_thread(self._next_token, hidden, sampler)
                done.completion_tokens += 1
                done.token_ids.append(token)
                if done.first_token_at is None:
                    done.first_token_at = time.perf_counter()
                if token in self.model.eos_ids:
                    done.finish_reason = "stop"
                    break
                history.append(token)
                text, stopped = stop.feed(restore(detok.push(token)))
                if text:
                    yield text
                if stopped:
                    done.finish_reason = "stop"
                    return
                if done.completion_tokens >= done.max_new_tokens:
                    done.finish_reason = "length"
                    break
                pending = [token]
            text, stopped = stop.feed(restore(detok.flush()) + (restorer.flush() if restorer else ""))
            tail = text if stopped else text + stop.flush()
            if tail:
                yield tail
        finally:
            # Runs on completion, error and client disconnect; shielded so cancellation cannot skip it.
            with anyio.CancelScope(shield=True):
                await self.core.close_session(session)
