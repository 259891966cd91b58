"""Attack D, for edge-held layers (k > 0): the core receives Q·h_k, the residual stream after block k−1.

Two parts, both from public material only:
- a learned inverter: text the operator makes itself (samples from the public model inside the
  public chat template for `budget` seconds, plus random vocabulary sequences) runs through the
  public blocks 0..k−1 with noise at the deployed σ, and a ridge map from h_k back to the
  token's embedding is fitted in closed form (a small MLP on top did not help in trials); the
  embeddings nearest in angle to its estimate rank candidates;
- layer matching, greedy left to right: at position t, the top candidates run through the public
  blocks 0..k−1 after the prefix recovered so far (its KV kept), and the one whose h_k is nearest
  in L1 to the de-rotated received state wins. Without noise the right token matches to float
  error, so a short list is tried first and the long one only where nothing matched.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from privacy_audit.attacks.nearest import derotate
from privacy_audit.knowledge import CHUNK_ROWS, Knowledge, PublicModel
from veil.model.decoder import DecoderStack

SHORT_LIST = 4
LONG_LIST = 32
ACCEPT = 1e-3  # relative L1 distance that counts as an exact match (float error is ~1e-6)
BATCH = 64  # prompts matched in lockstep
STARTERS = ["Write", "Can you", "My", "Please", "I need", "How do I", "What is", "Help me", "Draft", "Hi,",
            "Summarize", "Give me", "Explain", "Create", "Reply to", "Translate"]


@dataclasses.dataclass
class Corpus:
    """Token sequences the operator generated itself; nothing from the audited prompts."""

    sequences: list[list[int]]


def _system_prefix(tokenizer) -> list[int]:
    """The public chat template up to the user's first word, as any client would render it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=False,
                                         tokenize=False)
    return list(tokenizer(text[:text.index("\x00")], add_special_tokens=False)["input_ids"])


def make_corpus(public: PublicModel, budget: float, seed: int, length: int = 64, batch: int = 16,
                random_sequences: int = 256) -> Corpus:
    """Chat-style samples from the public model (temperature 1, batches until `budget` seconds are
    spent, at least one) plus uniformly random token sequences covering the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    seqs: list[list[int]] = []
    deadline = time.perf_counter() + budget
    while not seqs or time.perf_counter() < deadline:
        seqs += _sample_batch(public, [STARTERS[(len(seqs) + i) % len(STARTERS)] for i in range(batch)], length, gen)
    seqs += [torch.randint(0, public.vocab_size, (length,), generator=gen).tolist() for _ in range(random_sequences)]
    return Corpus(seqs)


def _sample_batch(public: PublicModel, starters: list[str], length: int, gen: torch.Generator) -> list[list[int]]:
    prefix = _system_prefix(public.tokenizer)
    stack, embed = public.stack(), public.embed
    seqs = [prefix + list(public.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in starters]
    sessions = [stack.new_session() for _ in seqs]
    pending, offsets = [list(s) for s in seqs], [0] * len(seqs)
    for _ in range(length):
        segs = [sess.begin(off, len(ids)) for sess, ids, off in zip(sessions, pending, offsets)]
        out = stack.step(embed[torch.tensor([t for ids in pending for t in ids])], segs)
        last = out[torch.tensor([seg.n for seg in segs]).cumsum(0) - 1]  # each sequence's last row
        nxt = torch.multinomial(F.softmax(public.logits(last), -1), 1, generator=gen)[:, 0].tolist()
        for i, tok in enumerate(nxt):
            offsets[i] += len(pending[i])
            seqs[i].append(tok)
            pending[i] = [tok]
    return seqs


def _noised(op: Knowledge, ids: list[int], gen: torch.Generator) -> torch.Tensor:
    """Embeddings as the edge sends them into its blocks: clipped and noised by the policy."""
    x = op.noise_means[torch.tensor(ids)]
    return x + op.sigma * torch.randn(x.shape, generator=gen) if op.sigma > 0 else x


def features(op: Knowledge, corpus: Corpus, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_k [N, d], token ids [N]) for every corpus position, through the public blocks 0..k−1."""
    stack = op.public.stack(0, op.edge_layers)
    gen = torch.Generator().manual_seed(seed)
    hs, ids = [], []
    for seq in corpus.sequences:
        sess = stack.new_session()
        hs.append(stack.step(_noised(op, seq, gen), [sess.begin(0, len(seq))]))
        ids.append(torch.tensor(seq))
    return torch.cat(hs), torch.cat(ids)


class Inverter:
    """h_k -> an estimate of the token's embedding (a linear map), candidates ranked by cosine."""

    def __init__(self, scale: float):
        self.scale = scale  # median ||h_k|| of the training text
        self.ridge = torch.empty(0)

    def inputs(self, h: torch.Tensor) -> torch.Tensor:
        # norms differ wildly between positions (attention sinks): give the map both the direction
        # and the raw state, and the log-norm
        norm = h.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.cat([h / norm, h / self.scale, torch.log(norm / self.scale), torch.ones_like(norm)], -1)

    @torch.no_grad()
    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.inputs(h.float()) @ self.ridge

    @torch.no_grad()
    def candidates(self, public: PublicModel, h: torch.Tensor, k: int) -> torch.Tensor:
        """[N, k] token ids whose embeddings point most nearly along the estimate (cosine)."""
        z = self.predict(h)
        unit = public.embed / public.embed_sqnorm.sqrt().clamp_min(1e-12)[:, None]
        return torch.cat([torch.topk(z[i:i + CHUNK_ROWS] @ unit.T, k, dim=-1).indices
                          for i in range(0, z.shape[0], CHUNK_ROWS)]) if z.shape[0] else torch.empty(0, k, dtype=torch.long)


def train_inverter(h: torch.Tensor, ids: torch.Tensor, public: PublicModel, ridge_lambda: float = 1e-4) -> Inverter:
    """Ridge regression from h_k features to the token's embedding, in closed form."""
    y = public.embed[ids]
    inv = Inverter(float(h.norm(dim=-1).median()))
    x = inv.inputs(h.float())
    gram = (x.T @ x).double()
    gram += ridge_lambda * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    inv.ridge = torch.linalg.solve(gram, (x.T @ y).double()).float()
    return inv


class _PrefixRunner:
    """The public blocks 0..k−1 for many candidate tokens at one position, each after its prompt's prefix."""

    def __init__(self, stack: DecoderStack, prompts: int, capacity: int):
        s = stack.spec
        assert all(layer.q_norm is None for layer in stack.layers), "per-head q/k norms are not supported here"
        self.stack, self.spec = stack, s
        shape = (prompts, s.num_layers, s.num_kv_heads, capacity, s.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)

    @torch.inference_mode()
    def run(self, rows: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, list]:
        """rows [P] prompt indices, x [P, C, d] candidate embeddings at position t -> (h_k [P, C, d], kv)."""
        s, st = self.spec, self.stack
        p, c, d = x.shape
        g, hd, kv = s.num_heads // s.num_kv_heads, s.head_dim, s.num_kv_heads
        cos, sin = st.rope(torch.tensor([t]))  # [1, 1, hd]
        h = x.reshape(p * c, d)
        new_kv = []
        for li, layer in enumerate(st.layers):
            qkv = layer.qkv(F.rms_norm(h, (d,), eps=s.rms_norm_eps))
            q = qkv[:, :st.q_rows].view(p * c, s.num_heads, hd)
            k = qkv[:, st.q_rows:st.q_rows + st.kv_rows].view(p * c, kv, hd)
            v = qkv[:, st.q_rows + st.kv_rows:].view(p, c, kv, hd)
            q = st.apply_rope(q, cos, sin).view(p, c, kv, g, hd).permute(0, 2, 3, 1, 4)  # [P,KV,g,C,hd]
            k = st.apply_rope(k, cos, sin).view(p, c, kv, hd)
            new_kv.append((k, v))
            pk, pv = self.k[rows, li, :, :t], self.v[rows, li, :, :t]  # [P, KV, t, hd]
            own = torch.einsum("pkgcd,pckd->pkgc", q, k)[..., None]
            scores = torch.cat([torch.einsum("pkgcd,pktd->pkgct", q, pk), own], -1) / hd ** 0.5
            prob = scores.softmax(-1)
            own_v = v.permute(0, 2, 1, 3)[:, :, None]  # [P, KV, 1, C, hd]
            out = torch.einsum("pkgct,pktd->pkgcd", prob[..., :t], pv) + prob[..., t:] * own_v
            h = h + layer.o(out.permute(0, 3, 1, 2, 4).reshape(p * c, s.num_heads * hd))
            gate, up = layer.gate_up(F.rms_norm(h, (d,), eps=s.rms_norm_eps)).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return h.view(p, c, d), new_kv

    def keep(self, rows: torch.Tensor, kv: list, choice: torch.Tensor, t: int) -> None:
        """Append each prompt's chosen candidate (index into C) to its prefix cache."""
        pick = torch.arange(len(rows))
        for li, (k, v) in enumerate(kv):
            self.k[rows, li, :, t] = k[pick, choice]
            self.v[rows, li, :, t] = v[pick, choice]


def _match(runner: _PrefixRunner, public: PublicModel, rows: torch.Tensor, target: torch.Tensor,
           cands: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(best candidate index [P], its relative L1 distance [P], kv) for candidates [P, C] at position t."""
    h, kv = runner.run(rows, public.embed[cands], t)
    dist = (h - target[:, None]).abs().sum(-1) / target.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    best = dist.argmin(-1)
    return best, dist[torch.arange(len(rows)), best], kv


def layer_match(op: Knowledge, observed: list, inverter: Inverter, short: int = SHORT_LIST,
                long: int = LONG_LIST, batch: int = BATCH) -> list[list[int]]:
    """Greedy left-to-right matching of each received prompt state against the public blocks."""
    public, stack = op.public, op.public.stack(0, op.edge_layers)
    out: list[list[int]] = []
    for start in range(0, len(observed), batch):
        chunk = observed[start:start + batch]
        lengths = torch.tensor([o.prompt_len for o in chunk])
        targets = [derotate(op, o.received[:o.prompt_len]) for o in chunk]
        ranked = [inverter.candidates(public, x, long) for x in targets]  # [T, long] per prompt
        runner = _PrefixRunner(stack, len(chunk), int(lengths.max()))
        result = [[0] * int(n) for n in lengths]
        for t in range(int(lengths.max())):
            rows = torch.nonzero(lengths > t).flatten()
            target = torch.stack([targets[i][t] for i in rows.tolist()])
            cands = torch.stack([ranked[i][t] for i in rows.tolist()])
            best, dist, kv = _match(runner, public, rows, target, cands[:, :short], t)
            redo = torch.nonzero(dist > ACCEPT).flatten()
            if len(redo):
                b2, _, kv2 = _match(runner, public, rows[redo], target[redo], cands[redo], t)
                runner.keep(rows[redo], kv2, b2, t)
                best[redo] = b2
                keep_rows = torch.ones(len(rows), dtype=torch.bool)
                keep_rows[redo] = False
                sel = torch.nonzero(keep_rows).flatten()
                if len(sel):
                    runner.keep(rows[sel], [(k[sel], v[sel]) for k, v in kv], best[sel], t)
            else:
                runner.keep(rows, kv, best, t)
            for j, i in enumerate(rows.tolist()):
                result[i][t] = int(cands[j, best[j]])
        out += result
    return out


def invert(op: Knowledge, observed: list, inverter: Inverter) -> list[list[int]]:
    """The inverter alone: nearest token to its estimate at each received prompt position."""
    return [inverter.candidates(op.public, derotate(op, o.received[:o.prompt_len]), 1)[:, 0].tolist()
            for o in observed]
