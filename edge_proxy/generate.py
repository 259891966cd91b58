"""The generation loop: embed -> core step -> LM head -> sample -> reply text, one Generation at a time each."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from typing import AsyncIterator

import anyio
import torch

from edge_proxy.compute import ComputeThread
from edge_proxy.core_client import CoreTransport
from edge_proxy.drafts import DraftPacer, NgramDrafter
from edge_proxy.edge_model import EdgeModel
from edge_proxy.generation import Generation, Status
from edge_proxy.head_batch import HeadBatcher
from edge_proxy.logprobs import TokenLogprob, prompt_logprobs, token_logprob
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.outgoing import OutgoingStates
from edge_proxy.reply_text import ReplyText
from edge_proxy.sampling import Sampler
from veil.errors import BundleMismatch, ContextLengthExceeded, CoreIdentityMismatch, CoreProtocolError, SessionLost
from veil.wire import StepRequest

log = logging.getLogger("veil.edge.generate")

_INLINE_ROWS = 8  # at most this many rows are embedded, noised and rotated on the event loop itself


class Engine:
    """Generates for many requests at once; each request holds its own core session."""

    def __init__(self, model: EdgeModel, core: CoreTransport, metrics: EdgeMetrics, default_max_tokens: int = 0,
                 speculative_tokens: int = 0, compute: ComputeThread | None = None):
        self.model, self.core, self.metrics = model, core, metrics
        # all of the edge's tensor work off the event loop, on one thread
        self.compute = compute or ComputeThread()
        self.head = HeadBatcher(model, metrics, self.compute)  # one LM-head GEMM per tick for all streams
        self.default_max_tokens = default_max_tokens
        self.speculative_tokens = speculative_tokens  # as configured (edge.speculative_tokens)
        self.draft_limit = 0  # drafts per step the verified core takes: set by connect()
        self.context_limit: int | None = None  # known once the core is verified; None means "ask it"

    def close(self) -> None:
        self.compute.close()

    async def connect(self) -> int:
        """Check that the core serves the bundle our Q belongs to and size the context from its limits.
        Done once, and again after the core has answered for another bundle."""
        if self.context_limit is not None:
            return self.context_limit
        info = await self.core.info()
        if info.get("bundle_id") != self.model.spec.bundle_id:
            raise BundleMismatch()
        core_limit = info.get("max_tokens_per_session")
        if core_limit is not None and (not isinstance(core_limit, int) or core_limit < 1):
            raise CoreProtocolError("the core's /v1/info gives no usable max_tokens_per_session")
        self.draft_limit = self._draft_limit(info)
        self.context_limit = min(self.model.spec.max_positions, core_limit or 1 << 30)
        log.info("core verified context_limit=%d draft_limit=%d", self.context_limit, self.draft_limit)
        return self.context_limit

    def _draft_limit(self, info: dict) -> int:
        """Draft tokens per step: as configured, within what the core returns per step, none if it cannot."""
        if self.speculative_tokens == 0:
            return 0
        if info.get("verifies_drafts") is not True:
            log.warning("edge.speculative_tokens=%d is not used: this core's engine recomputes a whole sequence "
                        "to return a step's draft rows", self.speculative_tokens)
            return 0
        rows = info.get("max_result_rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise CoreProtocolError("the core's /v1/info gives no usable max_result_rows")
        return min(self.speculative_tokens, rows - 1)

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """New tokens allowed for this prompt, or a 400 naming the limit."""
        limit = self.context_limit
        assert limit is not None, "connect() first"
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

    async def _send(self, outgoing: OutgoingStates, session: str, offset: int, ids: list[int],
                    rid: str, want: list[int] | None = None) -> torch.Tensor:
        """-> [len(want), d] rotated residual states of the wanted rows (the last one by default)."""
        # a decode step's row or two is cheaper inline than a thread hop; a prompt's rows (up to thousands of
        # embedding rows, each with fresh noise) and edge-held blocks are real compute: keep them off the loop
        states = outgoing(ids, offset) if self.model.edge_stack is None and len(ids) <= _INLINE_ROWS else \
            await self.compute.run(outgoing, ids, offset)
        req = StepRequest(session, offset, states, want or [-1], request_id=rid, bundle_id=self.model.spec.bundle_id)
        try:
            result = await self.core.step(req)
        except (BundleMismatch, CoreIdentityMismatch):
            self.context_limit = None  # the core was redeployed or replaced: verify it again before the next request
            raise
        self.metrics.core_compute.observe(result.compute_ms / 1000)
        return result.hidden

    async def _step(self, outgoing: OutgoingStates, session: str, offset: int, pending: list[int],
                    history: list[int], rid: str, want: list[int] | None = None) -> torch.Tensor:
        started = time.perf_counter()
        try:
            hidden = await self._send(outgoing, session, offset, pending, rid, want)
        except SessionLost:
            if offset == 0:
                raise
            # The core lost the session (idle expiry, restart): the edge has the history, so re-prefill.
            log.warning("core session lost; re-prefilling rid=%s tokens=%d", rid, len(history))
            self.metrics.reprefills.inc()
            hidden = await self._send(outgoing, session, 0, history, rid, want)  # decode steps want rows from the end
        self.metrics.step_roundtrip.observe(time.perf_counter() - started)
        return hidden

    def _choose(self, logits: torch.Tensor, sampler: Sampler, gen: Generation) -> tuple[int, TokenLogprob | None]:
        """The grammar's mask, sampling; the token's log-probability when asked (in the head's worker thread)."""
        token = sampler.sample(logits, None if gen.constraint is None else gen.constraint.allowed())
        logprob = None
        if token not in self.model.eos_ids:
            if gen.logprobs is not None:
                logprob = token_logprob(logits, token, gen.logprobs)
            if gen.constraint is not None:
                gen.constraint.advance(token)
        return token, logprob

    def _verify(self, logits: torch.Tensor, drafts: list[int], sampler: Sampler,
                gen: Generation) -> list[tuple[int, TokenLogprob | None]]:
        """[1 + len(drafts), V] logits -> the tokens this step gives, in order.

        Row i is the state after drafts[:i]. Each row is sampled as plain decoding would sample it, and the
        next row is read only while the token drawn is the draft that row assumed. The draft is fixed, so
        this keeps the sampler's distribution exactly (and greedy output, and a seed's draws, one per token)."""
        chosen = []
        for i, row in enumerate(logits):
            token, logprob = self._choose(row, sampler, gen)
            chosen.append((token, logprob))
            if (i == len(drafts) or token != drafts[i] or token in self.model.eos_ids
                    or (gen.constraint is not None and gen.constraint.complete)):
                break
        return chosen

    def _prefilled(self, rows: torch.Tensor, gen: Generation) -> torch.Tensor:
        """The prefill's rows -> the state after the prompt; the prompt's log-probabilities when asked."""
        if gen.prompt_logprobs is not None:
            logits = self.model.logits_rows(rows)
            gen.prompt_token_logprobs = prompt_logprobs(logits, gen.prompt_ids, gen.prompt_logprobs)
        return rows[-1]

    async def run(self, gen: Generation) -> AsyncIterator[str]:
        """Yield the reply's text deltas; `gen` holds the tokens, counts and the finish reason as it goes."""
        async for _, text in self.run_choices([gen]):
            if text is not None:
                yield text

    async def run_choices(self, gens: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
        """Generate each of `gens` (choices of one prompt) in turn on one core session: (choice, text delta),
        and (choice, None) once that choice has ended.

        The prompt is prefilled once. A later choice starts from the state after the prompt, and its first
        token goes to the core at the prompt's end, where the core rolls back the previous choice's tokens."""
        assert gens and all(g.prompt_ids == gens[0].prompt_ids for g in gens)
        session = secrets.token_hex(16)
        # one outgoing stream for every choice: the prompt's rows (and their noise) are drawn once
        outgoing = OutgoingStates(self.model, gens[0].noise, span_noise=gens[0].span_noise)
        after_prompt: torch.Tensor | None = None
        try:
            for index, gen in enumerate(gens):
                if after_prompt is None:
                    want = list(range(len(gen.prompt_ids))) if gen.prompt_logprobs is not None else None
                    rows = await self._step(outgoing, session, 0, gen.prompt_ids, gen.prompt_ids, gen.request_id,
                                            want)
                    after_prompt = await self.compute.run(self._prefilled, rows, gen)
                async for text in self._choice(gen, outgoing, session, after_prompt):
                    yield index, text
                yield index, None
        finally:
            # Runs on completion, error and client disconnect; shielded so cancellation cannot skip it.
            with anyio.CancelScope(shield=True):
                await self.core.close_session(session)

    async def _choice(self, gen: Generation, outgoing: OutgoingStates, session: str,
                      hidden: torch.Tensor) -> AsyncIterator[str]:
        sampler = Sampler(gen.sampling, self.model.vocab_size)
        reply = ReplyText(self.model.tokenizer, gen.prompt_ids, gen.stops, gen.restorer, gen.output_gate)
        history = list(gen.prompt_ids)
        gen.status = Status.RUNNING
        reason = "stop"  # EOS or a completed grammar, unless the token limit or the reply text ends it first
        ended: str | None = None  # set when the reply text itself ends the reply (a stop string, an output rule)
        drafter = NgramDrafter(history) if self.draft_limit else None
        pacer = DraftPacer(self.draft_limit)
        rows, drafts = hidden[None], list[int]()  # the states to sample from, and the drafts they verify
        try:
            while True:
                chosen = await self.head.run(rows, functools.partial(self._verify, drafts=drafts, sampler=sampler,
                                                                     gen=gen))
                if drafts:
                    kept = sum(token == draft for (token, _), draft in zip(chosen, drafts))  # _verify stops at a miss
                    self.metrics.draft_tokens.labels("accepted").inc(kept)
                    self.metrics.draft_tokens.labels("rejected").inc(len(drafts) - kept)
                    pacer.record(len(drafts), kept)
                done = False
                for i, (token, logprob) in enumerate(chosen):
                    gen.add_token(token)
                    if token in self.model.eos_ids:
                        done = True
                        break
                    if logprob is not None:
                        gen.token_logprobs.append(logprob)
                    history.append(token)
                    text, ended = reply.push(token)
                    if text:
                        yield text
                    # _verify stops at a completed grammar, so only the last token can complete it
                    if ended is not None or (i == len(chosen) - 1 and gen.constraint is not None
                                             and gen.constraint.complete):
                        done = True
                        break
                    if not gen.room_left:
                        reason, done = "length", True
                        break
                if done:
                    break
                drafts = []
                if drafter is not None:
                    drafter.extend(history[len(drafter.tokens):])
                    drafts = drafter.propose(min(pacer.allowance(), gen.max_new_tokens - gen.completion_tokens - 1))
                # the last token, then the drafts after it: a state back for each (the core drops rejected rows
                # of the last step, as it starts this one where they began)
                pending = [history[-1], *drafts]
                rows = await self._step(outgoing, session, len(history) - 1, pending, history + drafts,
                                        gen.request_id, list(range(-len(pending), 0)))
            if ended is None:  # EOS, the grammar or the token limit: release what the pipeline still holds
                tail, ended = reply.finish()
                if tail:
                    yield tail
            gen.blocked_rule = reply.blocked_rule
            gen.finish(ended or reason)
        except BaseException as exc:
            gen.abandon(cancelled=isinstance(exc, (GeneratorExit, asyncio.CancelledError)))
            raise
