"""Run the split pipeline in-process, as edge and core would, and record what the operator observes.

Prompts run in lockstep batches, one core session each, the way the core's scheduler batches
concurrent requests: each request has its own OutgoingStates (noise, edge-held blocks), the
core runs one DecoderStack.forward per step over all of them, and the edge picks each next
token greedily from its logits. Against a reference reply (the unprotected model's greedy
output) the trace also scores the defended model teacher-forced: until the first divergence
the generation *is* teacher-forced; after it, the remaining reference tokens run as one chunk.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from edge_proxy.chat_template import render_prompt
from edge_proxy.edge_model import EdgeModel
from edge_proxy.outgoing import NoiseSpec, OutgoingStates
from privacy_audit.prompts import Prompt
from veil.model.decoder import DecoderStack
from veil.model.kv import Session

MAX_NEW_TOKENS = 32
BATCH = 48  # prompts per lockstep batch: 48 core sessions of ~12 MB each

Outgoing = Callable[[list[int], int], torch.Tensor]  # (ids, offset) -> [n, d] states sent to the core
Logits = Callable[[torch.Tensor], torch.Tensor]  # [N, d] returned states -> [N, V]


@dataclasses.dataclass(slots=True)
class Encoded:
    """A prompt as token ids, and which positions carry message content (the scored, private ones)."""

    prompt: Prompt
    ids: list[int]
    private: list[bool]


@dataclasses.dataclass(slots=True)
class Observed:
    """Everything the core operator sees of one request."""

    prompt_len: int  # size of the first step: the prefill
    received: torch.Tensor  # [prompt_len + generated - 1, d] every vector sent to the core, in order
    returned: torch.Tensor  # [generated, d] the states returned: last prompt position, then each generated one


@dataclasses.dataclass(slots=True)
class Trace:
    """One request under one setting: the operator's observations and the ground truth to score them."""

    encoded: Encoded
    observed: Observed
    reply_ids: list[int]  # what the edge generated (EOS included when it came)
    ref_logprobs: list[float]  # defended log p of each reference reply token, teacher-forced
    ref_agree: list[bool]  # defended argmax == reference token, teacher-forced
    prefill_seconds: float = 0.0  # time in OutgoingStates for the prompt
    decode_seconds: list[float] = dataclasses.field(default_factory=list)  # per generated-token call


@dataclasses.dataclass(slots=True)
class Reference:
    """The unprotected model's greedy reply and its own log-probabilities."""

    ids: list[int]
    logprobs: list[float]


def encode(tokenizer, prompt: Prompt) -> Encoded:
    """Token ids exactly as the edge renders them, plus the content mask from character offsets."""
    text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    assert ids == render_prompt(tokenizer, prompt.messages)
    spans, cursor = [], 0
    for m in prompt.messages:
        start = text.index(m["content"], cursor)
        spans.append((start, start + len(m["content"])))
        cursor = start + len(m["content"])
    private = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    return Encoded(prompt, ids, private)


def core_step(stack: DecoderStack, work: list[tuple[Session, int, torch.Tensor]]) -> list[torch.Tensor]:
    """One batched core forward over (session, offset, states [n, d]) items -> outputs [n, d] per item."""
    segments = [sess.begin(offset, states.shape[0]) for sess, offset, states in work]
    out = stack.step(torch.cat([w[2] for w in work]), segments)
    return list(out.split([seg.n for seg in segments]))


class _Request:
    __slots__ = ("enc", "outgoing", "session", "reply", "received", "returned", "lp", "agree", "prefill_s",
                 "decode_s", "ref", "done")

    def __init__(self, enc: Encoded, outgoing: Outgoing, session: Session, ref: Reference | None):
        self.enc, self.outgoing, self.session, self.ref = enc, outgoing, session, ref
        self.reply: list[int] = []
        self.received: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []
        self.lp: list[float] = []
        self.agree: list[bool] = []
        self.prefill_s, self.done = 0.0, False
        self.decode_s: list[float] = []

    def send(self, ids: list[int], offset: int, record: bool = True) -> torch.Tensor:
        started = time.perf_counter()
        states = self.outgoing(ids, offset)
        elapsed = time.perf_counter() - started
        if record:
            self.received.append(states)
            if offset == 0:
                self.prefill_s = elapsed
            else:
                self.decode_s.append(elapsed)
        return states

    def diverged_at(self) -> int | None:
        """First reference step the generation did not follow, or None."""
        assert self.ref is not None
        for i, r in enumerate(self.ref.ids):
            if i >= len(self.reply) or self.reply[i] != r:
                return i
        return None


def _score(req: _Request, step: int, logits: torch.Tensor) -> None:
    """Teacher-forced utility at reference step `step` from that step's logits [V]."""
    if req.ref is None or step >= len(req.ref.ids):
        return
    target = req.ref.ids[step]
    req.lp.append(float(F.log_softmax(logits.double(), -1)[target]))
    req.agree.append(int(logits.argmax()) == target)


def run_batch(stack: DecoderStack, make_outgoing: Callable[[int], Outgoing], logits_fn: Logits,
              encoded: Sequence[Encoded], eos_ids: frozenset[int], references: Sequence[Reference] | None = None,
              max_new: int = MAX_NEW_TOKENS) -> list[Trace]:
    """Greedy generation for a batch of prompts; make_outgoing(i) builds request i's OutgoingStates."""
    # the sessions share a KV pool, as in the core, so each decode step attends all of them in one call per layer
    longest = max(len(e.ids) for e in encoded) + max([max_new] + [len(r.ids) for r in references or []])
    pool = stack.new_pool(len(encoded), longest)
    reqs = [_Request(e, make_outgoing(i), pool.session(), references[i] if references else None)
            for i, e in enumerate(encoded)]
    outs = core_step(stack, [(r.session, 0, r.send(r.enc.ids, 0)) for r in reqs])
    active, step = list(reqs), 0
    while active:
        rows = torch.stack([o[-1] for o in outs])  # aligned with `active`
        for r, h, lg in zip(active, rows, logits_fn(rows)):
            token = int(lg.argmax())
            r.returned.append(h.clone())
            r.reply.append(token)
            _score(r, step, lg)
            r.done = token in eos_ids or len(r.reply) >= max_new
        step += 1
        active = [r for r in active if not r.done]
        if active:
            offsets = [len(r.enc.ids) + len(r.reply) - 1 for r in active]
            outs = core_step(stack, [(r.session, off, r.send([r.reply[-1]], off))
                                      for r, off in zip(active, offsets)])
    _teacher_force_tails(stack, logits_fn, reqs)
    return [_finish(r) for r in reqs]


def _teacher_force_tails(stack: DecoderStack, logits_fn: Logits, reqs: list[_Request]) -> None:
    """Score reference steps after the first divergence by feeding the reference tokens as one chunk."""
    work, tails = [], []
    for r in reqs:
        if r.ref is None:
            continue
        j = r.diverged_at()
        if j is None or j + 1 >= len(r.ref.ids):
            continue
        del r.lp[j + 1:], r.agree[j + 1:]
        ids, offset = r.ref.ids[j:-1], len(r.enc.ids) + j
        work.append((r.session, offset, r.send(ids, offset, record=False)))
        tails.append((r, j + 1))
    if not work:
        return
    outs = core_step(stack, work)
    logits = logits_fn(torch.cat(outs))
    row = 0
    for (r, first), out in zip(tails, outs):
        for k in range(out.shape[0]):
            _score(r, first + k, logits[row])
            row += 1


def _finish(r: _Request) -> Trace:
    received = torch.cat(r.received) if r.received else torch.empty(0)
    obs = Observed(len(r.enc.ids), received, torch.stack(r.returned))
    assert received.shape[0] == len(r.enc.ids) + len(r.reply) - 1
    if r.ref is not None:
        assert len(r.lp) == len(r.ref.ids), (len(r.lp), len(r.ref.ids))
    return Trace(r.enc, obs, r.reply, r.lp, r.agree, r.prefill_s, r.decode_s)


def edge_logits(model: EdgeModel) -> Logits:
    """The edge's logits (EdgeModel.logits), batched over rows: final RMSNorm, then the rotated head."""
    d = model.spec.hidden_size

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(hidden.float(), (d,), eps=model.spec.rms_norm_eps)
        return model.head(h)

    return fn


def trace_setting(model: EdgeModel, core: DecoderStack, encoded: Sequence[Encoded], noise: NoiseSpec,
                  references: Sequence[Reference], seed: int, max_new: int = MAX_NEW_TOKENS,
                  batch: int = BATCH, on_batch: Callable[[int], None] | None = None) -> list[Trace]:
    """All prompts under one deployment (edge model + core stack) and noise policy."""
    traces: list[Trace] = []
    for start in range(0, len(encoded), batch):
        chunk = encoded[start:start + batch]

        def make(i: int, base: int = start) -> Outgoing:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + base + i)
            return OutgoingStates(model, noise, gen)

        traces += run_batch(core, make, edge_logits(model), chunk, model.eos_ids,
                            references[start:start + batch], max_new)
        if on_batch:
            on_batch(len(chunk))
    return traces


def reference_replies(stack: DecoderStack, embed: torch.Tensor, logits_fn: Logits, encoded: Sequence[Encoded],
                      eos_ids: frozenset[int], max_new: int = MAX_NEW_TOKENS, batch: int = BATCH,
                      on_batch: Callable[[int], None] | None = None) -> list[Reference]:
    """The unprotected, unsplit model's greedy replies (public weights, Q = I, no noise)."""
    refs: list[Reference] = []

    def make(_: int) -> Outgoing:
        return lambda ids, offset: embed[torch.tensor(ids, dtype=torch.long)]

    for start in range(0, len(encoded), batch):
        for t in run_batch(stack, make, logits_fn, encoded[start:start + batch], eos_ids, None, max_new):
            lp = F.log_softmax(logits_fn(t.observed.returned).double(), -1)
            refs.append(Reference(t.reply_ids, [float(lp[i, tok]) for i, tok in enumerate(t.reply_ids)]))
        if on_batch:
            on_batch(len(encoded[start:start + batch]))
    return refs
