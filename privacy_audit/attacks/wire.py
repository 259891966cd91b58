"""The wire observers: what an on-path party without keys reads from the edge<->core traffic.

Two recordings of the same traced requests (`privacy_audit.wire_capture`):

* `sealed`, what the product sends: each request a `veil.channel` session (HPKE hello, AES-GCM
  frames). The observer searches the recording for the rows' own bytes, parses the frames as
  best it can (the trailing whole rows of each ciphertext read as f32) and runs attacks F and T
  on that, and reports what the stream still shows: frame counts and sizes;
* `insecure` (`--insecure-transport`, for comparison only): the plaintext `veil.wire` frames,
  parsed with `veil.wire`, attacked by F (norm match, k = 0) and T (the template's known
  plaintext, Procrustes and bootstrap: `attacks/template.py`), also as a function of how many
  requests the observer has seen under the deployment's one Q.

Neither observer has the core bundle or Q; both know the public model and the deployment's
public policy (ρ, clip, k).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from edge_proxy.outgoing import NoiseSpec
from privacy_audit import metrics, wire_capture
from privacy_audit.attacks import norm_match, template
from privacy_audit.knowledge import PublicModel, WireKnowledge
from privacy_audit.trace import Encoded, Trace

MODES = ("sealed", "insecure")


def chance(encoded: Sequence[Encoded], seed: int = 0) -> dict[str, Any]:
    """Blind guessing's ceiling: the single most common content token guessed at every position
    (chosen with the answers, so no guess without them does better on average)."""
    counts: dict[int, int] = {}
    for e in encoded:
        for t, p in zip(e.ids, e.private):
            if p:
                counts[t] = counts.get(t, 0) + 1
    best = max(counts, key=lambda t: counts[t]) if counts else 0
    return metrics.bootstrap(metrics.token_recovery([[best] * len(e.ids) for e in encoded], encoded),
                             seed).as_dict()


def observe_setting(public: PublicModel, traces: Sequence[Trace], noise: NoiseSpec, edge_layers: int,
                    bundle_id: str, seed: int = 0, insecure: bool = False, curve: Sequence[int] = (),
                    q_true: torch.Tensor | None = None) -> dict[str, Any]:
    """The wire rows of one setting: always `sealed`; `insecure` too when asked, with the curve over
    the number of requests seen (each N in `curve` below the number of traced requests). `q_true` only
    scores T's estimate of Q on its span."""
    op = WireKnowledge(public, noise, edge_layers)
    ends = wire_capture.Endpoints(bundle_id)
    encoded = [t.encoded for t in traces]
    out: dict[str, Any] = {"chance": chance(encoded, seed)}
    for mode in MODES:
        if mode == "insecure" and not insecure:
            continue
        started = time.perf_counter()
        sealed = mode == "sealed"
        exchanges = wire_capture.record([t.observed for t in traces], ends, sealed)
        row = _observer(op, exchanges, traces, sealed, seed, () if sealed else curve, q_true)
        row["seconds"] = time.perf_counter() - started
        out[mode] = row
    return out


def _observer(op: WireKnowledge, exchanges: list[wire_capture.Exchange], traces: Sequence[Trace], sealed: bool,
              seed: int, curve: Sequence[int], q_true: torch.Tensor | None) -> dict[str, Any]:
    d = op.public.hidden_size
    tok = op.public.tokenizer
    encoded = [t.encoded for t in traces]
    replies = [t.reply_ids for t in traces]
    views = wire_capture.observe(exchanges, d, sealed)
    rows = torch.cat([torch.cat([t.observed.received, t.observed.returned]) for t in traces])
    row: dict[str, Any] = {
        "bytes": wire_capture.search(exchanges, rows),
        "metadata": wire_capture.metadata(exchanges, [len(e.ids) for e in encoded], [len(r) for r in replies], d),
        "entropy_bits_per_byte": wire_capture.entropy_bits_per_byte(exchanges),
        "prompt_length_parsed_exact": sum(v.prompt_len == len(e.ids) for v, e in zip(views, encoded)),
    }
    attacks: dict[str, Any] = {}
    reply: dict[str, Any] = {}
    if op.edge_layers == 0:  # F needs embeddings on the wire; with edge layers they are h_k
        attacks["F_norm"] = _dicts(metrics.privacy(norm_match.prompts(op, views), encoded, tok, seed))
        fed = [r[:-1] for r in replies]  # the last token is never fed back
        reply["F_norm"] = metrics.bootstrap(metrics.reply_recovery(norm_match.replies(op, views), fed),
                                            seed).as_dict()
    result = template.attack(op, views, seed=seed)
    attacks["T_template"] = _dicts(metrics.privacy(result.prompts, encoded, tok, seed))
    reply["T_template"] = metrics.bootstrap(metrics.reply_recovery(result.replies, replies), seed).as_dict()
    row.update(attacks=attacks, reply=reply, rank=result.rank, ranks=result.ranks,
               rotation_error=None if q_true is None else result.rotation_error(q_true))
    points = []
    for n in sorted({int(n) for n in curve if 0 < int(n) < len(traces)}):
        part = template.attack(op, views, learn=n, seed=seed)
        points.append({"requests": n, "rank": part.rank,
                       "token_recovery": metrics.bootstrap(metrics.token_recovery(part.prompts, encoded),
                                                           seed).as_dict(),
                       "reply": metrics.bootstrap(metrics.reply_recovery(part.replies, replies), seed).as_dict()})
    if points or curve:
        points.append({"requests": len(traces), "rank": result.rank,
                       "token_recovery": attacks["T_template"]["token_recovery"],
                       "reply": reply["T_template"]})
    row["curve"] = points
    return row


def _dicts(d: dict[str, metrics.Estimate]) -> dict[str, dict[str, Any]]:
    return {k: v.as_dict() for k, v in d.items()}
