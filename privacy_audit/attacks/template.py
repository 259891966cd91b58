"""Attack T: a wire observer's known plaintext. The chat template's fixed tokens anchor Q; a bootstrap does the rest.

Every request of a deployment starts with the same template tokens (SmolLM2: 24 of them, the
default system prompt and the role markers) and, before the reply, ends with the same six
(`<|im_end|>\\n<|im_start|>assistant\\n`); the observer finds them by rendering the public
template itself. All requests of a deployment are rotated by the same Q, so across N requests:

1. anchors: each fixed position's received vectors are pairs (a, Q·a + noise) with a known a:
   the (clipped) public embedding for k = 0; for k > 0 edge-held layers, the public model's h_k
   of the fixed prefix, which the observer computes itself (averaged over its own noise draws at
   the deployed σ). Summing the pairs over N requests averages the noise away as 1/√N;
2. orthogonal Procrustes on the pairs gives Q on their span only (rank r: 21 distinct template
   tokens at k = 0, 24 positions at k > 0), kept where the pairs' energy beats the noise;
3. decoding in the recovered subspace: a received y gives the coordinates of x in that span
   exactly (up to noise) and, because Q preserves norms, the length of the rest. A token v scores
   ||z − V_rᵀ·μ_v||² + (|y_⊥| − |μ_v⊥|)², the squared distance with the unknown part bounded by
   its norms; with r = 0 this is attack F (norm match), with r = d it is attack B (L2);
4. bootstrap: decodes whose posterior (among the best candidates, Gaussian noise at σ) is
   above 0.999 become new pairs; Procrustes is solved again on the larger set, and so on until the
   accepted set stops changing. For k > 0 a position is decoded left to right as attack D does,
   against the public blocks 0..k−1 after the prefix decoded so far: candidates are the public
   model's own next-token guesses and the tokens whose h_k right after the template is nearest in
   the subspace, and the candidate whose h_k is nearest (same score) wins;
5. read: prompts from the decoded positions; replies from the fed-back tokens (decoded the same
   way) plus the last token, read from the returned state through the public final norm and head
   on the recovered subspace.

The observer has no core bundle and never sees Q; it is told the deployment's public policy (ρ,
clip, k), as attack F is (the σ it uses can also be read off the anchors' spread).
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from edge_proxy.chat_template import render_prompt
from privacy_audit.attacks import lm_prior
from privacy_audit.attacks.layer_match import _PrefixRunner
from privacy_audit.knowledge import PublicModel, WireKnowledge, nearest_l2
from privacy_audit.trace import Observed

ACCEPT = 0.999  # posterior of the best candidate needed to become a new Procrustes pair
TOP = 8  # candidates kept per position for the posterior
ROUNDS = 10  # subspace-only bootstrap rounds at most (the accepted set usually settles sooner)
PRIOR_ROUNDS = 8  # then, under noise, rounds with the LM prior
SETTLED = 0.01  # a bootstrap stops when its accepted set changes by less than this share of positions
SNR = 0.5  # a direction of the span is kept when its pairs' signal is at least this fraction of the noise
FLOOR = 1e-3  # relative precision floor: float32 rows, and |y_⊥| = √(|y|² − |z|²) amplifies their rounding
LM_CANDIDATES = 16  # k > 0: the public model's next-token guesses tried at each position
TABLE_CANDIDATES = 16  # k > 0: tokens whose h_k after the template is nearest in the subspace
NOISE_DRAWS = 32  # k > 0: the observer's own noise draws to average the anchors' h_k
BATCH = 64  # requests decoded in lockstep for k > 0 (a step costs about the same for 1 or 64)
_PROBES = ["Hello there.", "Why?", "1 2 3", "Summarize: the cat sat on the mat"]


def template_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the token ids every rendered request starts and ends with, whatever the user writes."""
    renders = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in _PROBES]
    prefix = list(os.path.commonprefix(renders))
    suffix = list(os.path.commonprefix([r[::-1] for r in renders]))[::-1]
    shortest = min(len(r) for r in renders)
    return prefix, suffix[:max(0, shortest - len(prefix))]


@dataclasses.dataclass(slots=True)
class Subspace:
    """Q on the span of the pairs: y·u gives the coordinates (in the basis v) of the unrotated x.

    Each coordinate carries a weight w_i = σ / √var_i: a direction that the pairs cover with energy λ_i
    is estimated with an angular error of about σ·√(d/λ_i), which adds about σ²·|y|²/λ_i to the
    variance of that coordinate. Weighted coordinates have variance σ², like the rest."""

    u: torch.Tensor  # [d, r] rotated-frame basis
    v: torch.Tensor  # [d, r] unrotated-frame basis
    w: torch.Tensor  # [r] weights

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def features(self, y: torch.Tensor, noise_var: float) -> torch.Tensor:
        """[N, d] received -> [N, r + 1]: weighted subspace coordinates, then the noise-corrected norm of the rest."""
        y = y.double()
        z = y @ self.u
        rest = (y.pow(2).sum(-1) - z.pow(2).sum(-1) - (y.shape[-1] - self.rank) * noise_var).clamp_min(0).sqrt()
        return torch.cat([z * self.w, rest[:, None]], -1).float()

    def table(self, a: torch.Tensor) -> torch.Tensor:
        """[V, d] unrotated candidates -> [V, r + 1]: their weighted coordinates, then the norm of the rest."""
        z = a.float() @ self.v.float()  # float32 is precise enough here (FLOOR) and twice as fast on V rows
        rest = (a.double().pow(2).sum(-1) - z.double().pow(2).sum(-1)).clamp_min(0).sqrt()
        return torch.cat([z * self.w.float(), rest.float()[:, None]], -1)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """[N, d] received -> [N, d] the part of Qᵀ·y the observer knows (its projection on the span)."""
        return ((y.double() @ self.u) @ self.v.T).float()


class Pairs:
    """Σ y·aᵀ and Σ a·aᵀ over known (unrotated a, received y) pairs: enough to solve and rank Procrustes."""

    def __init__(self, d: int):
        self.cross = torch.zeros(d, d, dtype=torch.float64)
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.count, self.sqnorm = 0, 0.0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        if a.shape[0]:
            a, y = a.double(), y.double()
            self.cross += y.T @ a
            self.gram += a.T @ a
            self.count += a.shape[0]
            self.sqnorm += float(y.pow(2).sum())

    def copy(self) -> Pairs:
        out = Pairs(self.cross.shape[0])
        out.cross, out.gram, out.count, out.sqnorm = self.cross.clone(), self.gram.clone(), self.count, self.sqnorm
        return out

    def solve(self, noise_var: float) -> Subspace:
        """Procrustes on the span: SVD of Σ y·aᵀ = Q·Σ a·aᵀ (+ noise). A direction with energy λ in Σ a·aᵀ
        carries noise of norm about σ·√(d·λ); it is kept when λ > (SNR·σ)²·d (and above float dust), and
        weighted by its precision."""
        d = self.cross.shape[0]
        lam = torch.linalg.eigvalsh(self.gram).flip(0).clamp_min(0)
        if self.count == 0 or float(lam[0]) <= 0:
            empty = torch.zeros(d, 0, dtype=torch.float64)
            return Subspace(empty, empty, torch.zeros(0, dtype=torch.float64))
        u, _, vh = torch.linalg.svd(self.cross)
        keep = (lam > 1e-9 * lam[0]) & (lam > SNR * SNR * noise_var * d)
        r = int(keep.sum())
        w = torch.ones(r, dtype=torch.float64)
        if noise_var > 0:
            w = (1 + (self.sqnorm / self.count) / lam[:r]).rsqrt()
        return Subspace(u[:, :r], vh[:r].T, w)


@dataclasses.dataclass(slots=True)
class Decoded:
    ids: torch.Tensor  # [N] best candidate
    confident: torch.Tensor  # [N] bool: posterior above ACCEPT and a plausible distance
    vectors: torch.Tensor  # [N, d] the unrotated vector of the chosen candidate (the pair's a)


def _posterior(dist: torch.Tensor, noise_var: torch.Tensor, dims: int,
               sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dist [N, C] squared distances (any order), per-row noise variance [N], |y|² [N] ->
    (best index [N], confident [N])."""
    best = dist.argmin(-1)
    d1 = dist.gather(1, best[:, None])
    logits = -(dist - d1).double() / (2 * noise_var[:, None].double())
    post = 1.0 / torch.logsumexp(logits, -1).exp()
    # a true match sits at about dims·σ² from its candidate (plus float rounding of |y|², which the
    # norm of the unknown part inherits); far beyond that the row is no state of the model at all
    bound = noise_var.double() * (dims + 10 * math.sqrt(2 * dims) + 10) + 1e-5 * sqnorm.double()
    return best, (post >= ACCEPT) & (d1[:, 0].double() <= bound)


def _noise_var(op: WireKnowledge, y: torch.Tensor, extra: float = 0.0) -> torch.Tensor:
    """Per-row variance per dimension: the policy's σ² (or h_k's spread) plus the precision floor."""
    return op.sigma ** 2 + extra + (FLOOR * y.double().norm(dim=-1)) ** 2 / y.shape[-1]


# ---- k = 0: the received vectors are noised embeddings -----------------------------------------


def _decode_embeddings(op: WireKnowledge, sub: Subspace, y: torch.Tensor) -> Decoded:
    means = op.noise_means
    table = sub.table(means)
    ids, dist = nearest_l2(sub.features(y, op.sigma ** 2), table, TOP)
    best, confident = _posterior(dist, _noise_var(op, y), sub.rank + 1, y.double().pow(2).sum(-1))
    chosen = ids.gather(1, best[:, None])[:, 0]
    return Decoded(chosen, confident, means[chosen])


def _known_positions(obs: Observed, prefix: list[int], suffix: list[int]) -> dict[int, int]:
    """Position -> template token, for positions fixed by the template (prefix and the prompt's last ones)."""
    known = {i: t for i, t in enumerate(prefix) if i < obs.prompt_len}
    start = obs.prompt_len - len(suffix)
    if start >= len(prefix):
        known.update({start + i: t for i, t in enumerate(suffix)})
    return known


def _anchor_pairs_k0(op: WireKnowledge, observed: Sequence[Observed], prefix: list[int],
                     suffix: list[int]) -> Pairs:
    pairs = Pairs(op.public.hidden_size)
    for o in observed:
        known = _known_positions(o, prefix, suffix)
        pos = torch.tensor(sorted(known))
        pairs.add(op.noise_means[torch.tensor([known[int(p)] for p in pos])], o.received[pos])
    return pairs


def _prior_decode(op: WireKnowledge, sub: Subspace, observed: Sequence[Observed], known: list[dict[int, int]],
                  guess: list[torch.Tensor] | None = None, passes: int = 1) -> list[Decoded]:
    """LM-prior decoding of every received row (prompt and fed-back tokens), cheap enough to repeat each
    round: the subspace's top candidates per position, and the public model's prior given the current
    guess of the sequence (one batched forward over all requests). Each pass takes at every position the
    candidate with the highest posterior (noise likelihood times prior) as the new guess; a position is
    confident when that posterior reaches ACCEPT. The template's positions stay fixed. Only the
    candidates' logits are needed: the prior's normaliser is the same for all candidates of a position."""
    means, public, stack = op.noise_means, op.public, op.public.stack()
    table = sub.table(means)
    sizes = [o.received.shape[0] for o in observed]
    rows = torch.cat([o.received for o in observed])
    ids, dist = nearest_l2(sub.features(rows, op.sigma ** 2), table, lm_prior.TOP_M)
    like = -dist.double() / (2 * _noise_var(op, rows)[:, None])
    pos = torch.cat([torch.tensor(sorted(f), dtype=torch.long) + sum(sizes[:i]) for i, f in enumerate(known)])
    pin = torch.tensor([f[p] for f in known for p in sorted(f)], dtype=torch.long)
    first = torch.zeros(len(rows), dtype=torch.bool)
    first[torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])] = True
    seq = (torch.cat(guess) if guess is not None else ids[:, 0]).clone()
    seq[pos] = pin
    post = torch.zeros(len(rows), dtype=torch.float64)
    for _ in range(passes):
        prior = torch.zeros_like(like)
        for start in range(0, len(observed), BATCH):
            lo, hi = sum(sizes[:start]), sum(sizes[:start + BATCH])
            segs = [stack.new_session().begin(0, n) for n in sizes[start:start + BATCH]]
            with torch.inference_mode():
                hidden = stack.step(public.embed[seq[lo:hi]], segs)
                normed = F.rms_norm(hidden, (hidden.shape[-1],), eps=public.eps)
                # row t predicts t + 1: shift within each request (a request's first row has no prefix)
                logit = torch.einsum("nd,nmd->nm", normed[:-1], public.head[ids[lo + 1:hi]]).double()
            prior[lo + 1:hi] = logit
        prior[first] = 0.0
        post, best = (like + prior).softmax(-1).max(-1)
        new = ids.gather(1, best[:, None])[:, 0]
        new[pos] = pin
        if torch.equal(new, seq):
            break
        seq = new
    confident = post >= ACCEPT
    confident[pos] = False
    return [Decoded(a, b, means[a]) for a, b in zip(seq.split(sizes), confident.split(sizes))]


def _settled(mask: torch.Tensor, before: torch.Tensor, ranks: list[int]) -> bool:
    """The accepted set changed by at most SETTLED of the positions since the last round, or the
    subspace has not grown for two rounds."""
    stalled = len(ranks) >= 3 and ranks[-1] <= ranks[-3]
    return stalled or int((mask != before).sum()) <= max(1, SETTLED * mask.numel())


def _bootstrap_k0(op: WireKnowledge, learn: Sequence[Observed], prefix: list[int],
                  suffix: list[int]) -> tuple[Subspace, list[int], Pairs]:
    """Subspace rounds until the accepted set settles; then, under noise, rounds with the LM prior."""
    anchors = _anchor_pairs_k0(op, learn, prefix, suffix)
    rows = torch.cat([o.received for o in learn]) if learn else torch.empty(0, op.public.hidden_size)
    known = [_known_positions(o, prefix, suffix) for o in learn]
    sub, history, solved = anchors.solve(op.sigma ** 2), [], anchors
    guess: list[torch.Tensor] | None = None
    for stage in ("subspace", "prior"):
        if stage == "prior" and (op.sigma == 0 or not learn):
            break
        accepted = torch.zeros(len(rows), dtype=torch.bool)
        rounds = ROUNDS if stage == "subspace" else PRIOR_ROUNDS
        for i in range(rounds):
            history.append(sub.rank)
            if stage == "subspace":
                dec = _decode_embeddings(op, sub, rows)
                mask, vectors = dec.confident, dec.vectors
            else:
                decoded = _prior_decode(op, sub, learn, known, guess)
                guess = [d.ids for d in decoded]
                mask = torch.cat([d.confident for d in decoded])
                vectors = torch.cat([d.vectors for d in decoded])
            if _settled(mask, accepted, history):
                break
            accepted = mask
            pairs = anchors.copy()
            pairs.add(vectors[accepted], rows[accepted])
            sub, solved = pairs.solve(op.sigma ** 2), pairs
    return sub, history, solved


# ---- k > 0: the received vectors are h_k of the noised embeddings --------------------------------


def _anchor_states(op: WireKnowledge, prefix: list[int], seed: int) -> tuple[torch.Tensor, float]:
    """([P, d] the prefix's h_k as the edge would send it, averaged over the observer's own noise draws;
    its per-dimension variance under the noise, median over positions)."""
    stack = op.public.stack(0, op.edge_layers)
    x = op.noise_means[torch.tensor(prefix)]
    draws = NOISE_DRAWS if op.sigma > 0 else 1
    gen = torch.Generator().manual_seed(seed)
    hs = []
    for _ in range(draws):
        noisy = x + op.sigma * torch.randn(x.shape, generator=gen) if op.sigma > 0 else x
        hs.append(stack.step(noisy, [stack.new_session().begin(0, len(prefix))]))
    h = torch.stack(hs)
    var = float(h.var(0).mean(-1).median()) if draws > 1 else 0.0
    return h.mean(0), var


@lru_cache(maxsize=2)
def _after_template(public: PublicModel, k: int, prefix: tuple[int, ...]) -> torch.Tensor:
    """[V, d] every vocabulary token's h_k right after the template prefix (clean): the proposal table."""
    stack = public.stack(0, k)
    runner = _PrefixRunner(stack, 1, len(prefix) + 1)
    zero = torch.zeros(1, dtype=torch.long)
    for t, tok in enumerate(prefix):
        _, kv = runner.run(zero, public.embed[torch.tensor([[tok]])], t)
        runner.keep(zero, kv, zero, t)
    out = []
    for start in range(0, public.vocab_size, 2048):
        h, _ = runner.run(zero, public.embed[start:start + 2048][None], len(prefix))
        out.append(h[0])
    return torch.cat(out)


class _Layers:
    """Left-to-right decoding of a batch of requests against the public blocks 0..k−1 (attack D's matcher),
    with the public model's next-token guesses as candidates."""

    def __init__(self, op: WireKnowledge, batch: Sequence[Observed], prefix: list[int], suffix: list[int]):
        self.op, self.batch, self.prefix, self.suffix = op, batch, prefix, suffix
        self.lengths = torch.tensor([o.received.shape[0] for o in batch])
        self.runner = _PrefixRunner(op.public.stack(0, op.edge_layers), len(batch), int(self.lengths.max()))
        self.lm = op.public.stack()
        self.sessions = [self.lm.new_session() for _ in batch]

    @torch.inference_mode()
    def run(self, sub: Subspace, proposals: list[torch.Tensor], extra_var: float) -> list[Decoded]:
        op, public, n = self.op, self.op.public, len(self.batch)
        known = [_known_positions(o, self.prefix, self.suffix) for o in self.batch]
        ids = [torch.zeros(int(m), dtype=torch.long) for m in self.lengths]
        conf = [torch.zeros(int(m), dtype=torch.bool) for m in self.lengths]
        vecs = [torch.zeros(int(m), public.hidden_size) for m in self.lengths]
        next_guess: list[torch.Tensor | None] = [None] * n
        # the template prefix is the same for every request: the public model reads it as one chunk
        shared = min([len(self.prefix)] + [o.prompt_len - 1 for o in self.batch])
        if shared > 0:
            segs = [sess.begin(0, shared) for sess in self.sessions]
            x = public.embed[torch.tensor(self.prefix[:shared])].repeat(n, 1)
            last = self.lm.step(x, segs).view(n, shared, -1)[:, -1]
            top = public.logits(last).topk(LM_CANDIDATES, dim=-1).indices
            next_guess = list(top)
        for t in range(int(self.lengths.max())):
            rows = torch.nonzero(self.lengths > t).flatten()
            width = 1 if all(t in known[i] for i in rows.tolist()) else LM_CANDIDATES + TABLE_CANDIDATES
            cands = []
            for i in rows.tolist():
                if t in known[i]:
                    cands.append(torch.full((width,), known[i][t]))
                else:
                    guess = next_guess[i]
                    lm = guess if guess is not None else proposals[i][t, :LM_CANDIDATES]
                    cands.append(torch.cat([lm, proposals[i][t, :TABLE_CANDIDATES]]))
            cand = torch.stack(cands)  # [R, C]
            h, kv = self.runner.run(rows, public.embed[cand], t)  # clean embeddings: the observer has no noise draw
            y = torch.stack([self.batch[i].received[t] for i in rows.tolist()])
            fy = sub.features(y, op.sigma ** 2 + extra_var)  # [R, r+1]
            fh = sub.table(h.reshape(-1, h.shape[-1])).view(len(rows), cand.shape[1], -1)
            dist = (fh - fy[:, None]).pow(2).sum(-1)
            best, ok = _posterior(dist, _noise_var(op, y, extra_var), sub.rank + 1, y.double().pow(2).sum(-1))
            self.runner.keep(rows, kv, best, t)
            chosen = cand.gather(1, best[:, None])[:, 0]
            for j, i in enumerate(rows.tolist()):
                ids[i][t], conf[i][t], vecs[i][t] = chosen[j], ok[j] and t not in known[i], h[j, best[j]]
            if t < shared:
                continue
            # the public model's guesses for t + 1, after the tokens decoded so far
            segs = [self.sessions[i].begin(t, 1) for i in rows.tolist()]
            out = self.lm.step(public.embed[chosen], segs)
            top = public.logits(out).topk(LM_CANDIDATES, dim=-1).indices
            for j, i in enumerate(rows.tolist()):
                next_guess[i] = top[j]
        return [Decoded(a, b, c) for a, b, c in zip(ids, conf, vecs)]


def _decode_layers(op: WireKnowledge, sub: Subspace, observed: Sequence[Observed], prefix: list[int],
                   suffix: list[int], extra_var: float) -> list[Decoded]:
    table = sub.table(_after_template(op.public, op.edge_layers, tuple(prefix)))
    out: list[Decoded] = []
    for start in range(0, len(observed), BATCH):
        batch = observed[start:start + BATCH]
        proposals = []
        for o in batch:
            ids, _ = nearest_l2(sub.features(o.received, op.sigma ** 2 + extra_var), table, TABLE_CANDIDATES)
            proposals.append(ids)
        out += _Layers(op, batch, prefix, suffix).run(sub, proposals, extra_var)
    return out


def _bootstrap_layers(op: WireKnowledge, learn: Sequence[Observed], prefix: list[int], suffix: list[int],
                      seed: int) -> tuple[Subspace, list[int], float, list[Decoded], Pairs]:
    """Rounds of left-to-right layer matching until the accepted set settles; returns the subspace the
    last round decoded with, and that decode."""
    states, extra_var = _anchor_states(op, prefix, seed)
    anchors = Pairs(op.public.hidden_size)
    for o in learn:
        p = min(len(prefix), o.prompt_len)
        anchors.add(states[:p], o.received[:p])
    noise = op.sigma ** 2 + extra_var
    sub, history, decoded, solved = anchors.solve(noise), [], [], anchors
    accepted = torch.zeros(sum(o.received.shape[0] for o in learn), dtype=torch.bool)
    for i in range(ROUNDS):
        history.append(sub.rank)
        decoded = _decode_layers(op, sub, learn, prefix, suffix, extra_var)
        mask = torch.cat([d.confident for d in decoded]) if decoded else accepted
        if i == ROUNDS - 1 or _settled(mask, accepted, history):
            break
        accepted = mask
        pairs = anchors.copy()
        for o, d in zip(learn, decoded):
            pairs.add(d.vectors[d.confident], o.received[d.confident])
        sub, solved = pairs.solve(noise), pairs
    return sub, history, extra_var, decoded, solved


# ---- the attack ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Result:
    prompts: list[list[int]]  # every request's prompt tokens as decoded
    replies: list[list[int]]  # every request's generated tokens as decoded
    rank: int  # dimension of the recovered subspace (d = all of Q)
    ranks: list[int]  # the rank at each bootstrap round
    learned_from: int  # requests whose anchors and decodes fed Procrustes
    subspace: Subspace  # Q as recovered, on its span

    def rotation_error(self, q_true: torch.Tensor) -> float:
        """||Q̂·v − Q·v|| / ||Q·v|| on the recovered span (scoring only: the harness holds the true Q)."""
        if self.rank == 0:
            return float("nan")
        truth = q_true.double() @ self.subspace.v
        return float((self.subspace.u - truth).norm() / truth.norm())


def attack(op: WireKnowledge, observed: Sequence[Observed], learn: int | None = None, seed: int = 0) -> Result:
    """Recover Q on a subspace from the first `learn` requests (all by default), then read every request."""
    prefix, suffix = template_tokens(op.public.tokenizer)
    learn_set = list(observed[:learn] if learn is not None else observed)
    if op.edge_layers == 0:
        sub, history, solved = _bootstrap_k0(op, learn_set, prefix, suffix)
        if op.sigma > 0 and observed:
            known = [_known_positions(o, prefix, suffix) for o in observed]
            reads = _prior_decode(op, sub, observed, known, passes=3)
        else:
            rows = torch.cat([o.received for o in observed]) if observed else torch.empty(0, op.public.hidden_size)
            dec = _decode_embeddings(op, sub, rows)
            sizes = [o.received.shape[0] for o in observed]
            reads = [Decoded(a, b, c) for a, b, c in zip(dec.ids.split(sizes), dec.confident.split(sizes),
                                                         dec.vectors.split(sizes))]
    else:
        sub, history, extra_var, last_round, solved = _bootstrap_layers(op, learn_set, prefix, suffix, seed)
        if len(learn_set) == len(observed):  # the last round already read every request with this subspace
            reads = last_round
        else:
            reads = _decode_layers(op, sub, observed, prefix, suffix, extra_var)
    if op.sigma == 0:
        sub = _with_returned(op, solved, learn_set, reads[:len(learn_set)], prefix, suffix, sub)
    tails = _last_tokens(op, sub, observed, [d.ids for d in reads])
    prompts, replies = [], []
    for o, d, tail in zip(observed, reads, tails):
        prompts.append(d.ids[:o.prompt_len].tolist())
        replies.append(d.ids[o.prompt_len:].tolist() + [tail])
    return Result(prompts, replies, sub.rank, history, len(learn_set), sub)


def _with_returned(op: WireKnowledge, solved: Pairs, learn: Sequence[Observed], reads: Sequence[Decoded],
                   prefix: list[int], suffix: list[int], sub: Subspace) -> Subspace:
    """Without noise, a request read with confidence gives more exact pairs: its returned states are Q·h_L
    of the tokens read, which the public model computes. Each returned state counts once every position
    up to its own was read with confidence. They fill Q out towards all of d."""
    sure = []
    for o, d in zip(learn, reads):
        bad = d.confident.clone().logical_not()
        bad[torch.tensor(sorted(_known_positions(o, prefix, suffix)), dtype=torch.long)] = False
        first_bad = int(bad.nonzero()[0]) if bool(bad.any()) else len(d.ids)
        usable = min(o.returned.shape[0], first_bad - o.prompt_len + 1)  # returned i answers position P-1+i
        if usable > 0:
            sure.append((o, d, usable))
    if not sure:
        return sub
    pairs = solved.copy()
    for (o, _, usable), h in zip(sure, _forward(op.public, [d.ids for _, d, _ in sure])):
        pairs.add(h[o.prompt_len - 1:o.prompt_len - 1 + usable], o.returned[:usable])
    return pairs.solve(0.0)


def _last_tokens(op: WireKnowledge, sub: Subspace, observed: Sequence[Observed],
                 reads: Sequence[torch.Tensor]) -> list[int]:
    """The last generated token is never fed back: read it from the last returned state through the public
    final norm and head where Q is known on all of d; elsewhere take the public model's own greedy choice
    after the tokens read (what the edge chose, without noise)."""
    if not observed:
        return []
    if sub.rank == op.public.hidden_size:
        last = torch.stack([o.returned[-1] for o in observed])
        return op.public.logits(sub.unrotate(last)).argmax(-1).tolist()
    ends = torch.cat([h[-1:] for h in _forward(op.public, reads)])
    return op.public.logits(ends).argmax(-1).tolist()


def _forward(public: PublicModel, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The public model's residual stream h_L (before the final norm) over each token sequence, batched."""
    stack, out = public.stack(), []
    for start in range(0, len(seqs), BATCH):
        chunk = seqs[start:start + BATCH]
        with torch.inference_mode():
            h = stack.step(public.embed[torch.cat(list(chunk))], [stack.new_session().begin(0, len(s)) for s in chunk])
        out += list(h.split([len(s) for s in chunk]))
    return out
