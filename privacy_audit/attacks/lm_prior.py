"""Attack C: LM-prior decoding of noised embeddings (BeamClean-style MAP), the main attack on noise.

Each position's de-rotated input x̂_t = e_t + n_t with n ~ N(0, σ²I) and σ known from the
policy. The attack searches for the token sequence maximising
    Σ_t [ −||x̂_t − e_{v_t}||² / 2σ² + log p_LM(v_t | v_<t) ],
with the public model itself as the prior: a beam over the top-M likelihood candidates per
position. It stays cheap because it is lazy: candidates and beams farther than `margin` nats
behind the best are dropped, and the prior is only queried where more than one hypothesis is
alive, feeding the accumulated prefix as one chunk; and a fork is settled `window` positions
later (beams that disagree with the best one there are dropped), so the prior judges each
choice on the tokens that follow it without keeping every hypothesis alive to the end.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from privacy_audit.attacks.nearest import Candidates, candidates
from privacy_audit.knowledge import Knowledge
from privacy_audit.trace import Observed, core_step
from veil.model.decoder import DecoderStack
from veil.model.kv import Session

BEAM = 4  # 4 and 8 and 16 recover the same on the bundled model (trials at rho 2-4); 4 is cheapest
TOP_M = 32
MARGIN = 12.0  # nats: a hypothesis this far behind has posterior odds below 1e-5
WINDOW = 4  # positions of right context the prior gets before a fork is settled
BATCH = 64  # prompts decoded in lockstep (each holds up to BEAM small KV caches, ~4 MB apiece)


@dataclasses.dataclass(slots=True)
class _Beam:
    tokens: list[int]
    score: float
    session: Session | None = None
    fed: int = 0  # tokens already in the session's cache


def _fork(stack: DecoderStack, beam: _Beam, capacity: int) -> Session:
    """The beam's cache for a new child, or a fresh one; exact-size, since beams are many and prompts short."""
    if beam.session is not None:
        return beam.session.fork()
    return stack.new_session(limit=capacity, capacity=capacity)


class _Decoder:
    """Beam state of one prompt."""

    def __init__(self, cand: Candidates, sigma: float, top_m: int, margin: float, window: int):
        ll = -cand.sqdist[:, :top_m].double() / (2 * sigma * sigma)  # [T, M] noise log-likelihood
        self.ids, self.ll = cand.ids[:, :top_m], ll
        self.length, self.margin, self.window = ll.shape[0], margin, window
        self.beams = [_Beam([], 0.0)]

    def options(self, t: int) -> tuple[list[int], list[float]]:
        keep = self.ll[t] >= self.ll[t, 0] - self.margin
        return self.ids[t][keep].tolist(), self.ll[t][keep].tolist()

    def best(self) -> list[int]:
        return max(self.beams, key=lambda b: b.score).tokens


def _extend(stack: DecoderStack, dec: _Decoder, t: int, lp: list[torch.Tensor] | None, beam_width: int,
            capacity: int) -> None:
    """Expand every beam by the position-t candidates (with prior log-probs lp[b] when given) and prune."""
    cand, ll = dec.options(t)
    scored = []
    for b, beam in enumerate(dec.beams):
        prior = lp[b][cand].tolist() if lp is not None else [0.0] * len(cand)
        scored += [(beam.score + like + p, b, c) for c, like, p in zip(cand, ll, prior)]
    scored.sort(key=lambda s: -s[0])
    top = [s for s in scored[:beam_width] if s[0] >= scored[0][0] - dec.margin]
    used: set[int] = set()
    beams = []
    for score, b, c in top:
        parent = dec.beams[b]
        if b in used:  # a second child of the same parent gets its own copy of the cache
            beams.append(_Beam(parent.tokens + [c], score, _fork(stack, parent, capacity), parent.fed))
        else:
            used.add(b)
            beams.append(_Beam(parent.tokens + [c], score, parent.session, parent.fed))
    if t >= dec.window:  # settle the choice made `window` positions ago
        settled = beams[0].tokens[t - dec.window]
        beams = [b for b in beams if b.tokens[t - dec.window] == settled]
    dec.beams = beams


def _prior(op: Knowledge, stack: DecoderStack, beams: list[_Beam], capacity: int) -> torch.Tensor:
    """[len(beams), V] log p_LM(next | beam prefix): feeds each beam's unfed tokens as one chunk."""
    work = []
    for beam in beams:
        if beam.session is None:
            beam.session = _fork(stack, beam, capacity)
        ids = torch.tensor(beam.tokens[beam.fed:], dtype=torch.long)
        work.append((beam.session, beam.fed, op.public.embed[ids]))
    outs = core_step(stack, work)
    for beam in beams:
        beam.fed = len(beam.tokens)
    last = torch.stack([o[-1] for o in outs])
    return F.log_softmax(op.public.logits(last), dim=-1)


def decode(op: Knowledge, observed: list[Observed], beam: int = BEAM, top_m: int = TOP_M,
           margin: float = MARGIN, window: int = WINDOW, batch: int = BATCH,
           cands: list[Candidates] | None = None) -> list[list[int]]:
    """MAP prompt tokens under noise likelihood + public-model prior, for each request.

    `cands` may pass attack B's candidates (at least `top_m` per position) to save recomputing them.
    """
    assert op.sigma > 0, "attack C needs noise (sigma > 0); without it B is already exact"
    stack = op.public.stack()
    out: list[list[int]] = []
    for start in range(0, len(observed), batch):
        chunk = observed[start:start + batch]
        found = candidates(op, chunk, top_m) if cands is None else cands[start:start + batch]
        decs = [_Decoder(c, op.sigma, top_m, margin, window) for c in found]
        capacity = max(d.length for d in decs)
        for t in range(capacity):
            live = [d for d in decs if t < d.length]
            # the prior matters only where two hypotheses compete; position 0 has no prefix to condition on
            needs = [d for d in live if t > 0 and (len(d.beams) > 1 or len(d.options(t)[0]) > 1)]
            for d in live:
                if d not in needs:
                    _extend(stack, d, t, None, beam, capacity)
            if needs:
                rows = [b for d in needs for b in d.beams]
                lp = _prior(op, stack, rows, capacity)
                i = 0
                for d in needs:
                    n = len(d.beams)
                    _extend(stack, d, t, list(lp[i:i + n]), beam, capacity)
                    i += n
        out += [d.best() for d in decs]
    return out


def recover(op: Knowledge, observed: Observed) -> list[int]:
    return decode(op, [observed])[0]
