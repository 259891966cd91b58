"""Scores of one setting: privacy (what the attacks recover) and utility (against the unprotected model).

The prompt is the unit: every rate is computed per prompt first, and 95% intervals are Wilson
intervals for per-prompt yes/no outcomes and percentile bootstrap intervals (prompts resampled)
for per-prompt means. Token positions are scored only where message content sits; the chat
template's fixed text is public and would inflate every number.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from privacy_audit.trace import Encoded, Reference, Trace

Z95 = 1.959963984540054
BOOTSTRAP = 2000
DELTA = 1e-5


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    """A mean over prompts with its 95% interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def wilson(successes: int, n: int, z: float = Z95) -> Estimate:
    """Proportion with its Wilson score interval."""
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not float dust
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, lo, hi, n)


def bootstrap(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP) -> Estimate:
    """Mean with a percentile bootstrap interval, resampling prompts."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size))


def _private_hits(recovered: Sequence[int], enc: Encoded) -> list[bool]:
    return [i < len(recovered) and recovered[i] == t for i, (t, p) in enumerate(zip(enc.ids, enc.private)) if p]


def token_recovery(recovered: Sequence[Sequence[int]], encoded: Sequence[Encoded]) -> list[float]:
    """Per prompt: fraction of content positions recovered exactly (position by position)."""
    out = []
    for r, e in zip(recovered, encoded):
        hits = _private_hits(r, e)
        out.append(sum(hits) / len(hits) if hits else 1.0)
    return out


def exact_prompt(recovered: Sequence[Sequence[int]], encoded: Sequence[Encoded]) -> list[bool]:
    """Per prompt: every content position recovered."""
    return [all(_private_hits(r, e)) for r, e in zip(recovered, encoded)]


def canary_hits(recovered: Sequence[Sequence[int]], encoded: Sequence[Encoded], tokenizer: Any) -> list[float]:
    """Per prompt: fraction of its canaries whose exact string appears in the decoded recovered prompt."""
    out = []
    for r, e in zip(recovered, encoded):
        text = tokenizer.decode(list(r), skip_special_tokens=False)
        canaries = e.prompt.canaries
        out.append(sum(c in text for c in canaries) / len(canaries) if canaries else 1.0)
    return out


def reply_recovery(recovered: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]) -> list[float]:
    """Per request: fraction of generated tokens read back exactly."""
    return [sum(a == b for a, b in zip(r, g)) / len(g) if g else 1.0 for r, g in zip(recovered, replies)]


def privacy(recovered: Sequence[Sequence[int]], encoded: Sequence[Encoded], tokenizer: Any,
            seed: int = 0) -> dict[str, Estimate]:
    """An attack's prompt-recovery scores over all prompts of a setting."""
    exact = exact_prompt(recovered, encoded)
    return {
        "token_recovery": bootstrap(token_recovery(recovered, encoded), seed),
        "exact_prompt": wilson(sum(exact), len(exact)),
        "canary": bootstrap(canary_hits(recovered, encoded, tokenizer), seed),
    }


def utility(traces: Sequence[Trace], references: Sequence[Reference], seed: int = 0) -> dict[str, Estimate]:
    """Teacher-forced top-1 agreement, 32-token greedy exact match, log-likelihood gap, first divergence."""
    agree = [sum(t.ref_agree) / len(t.ref_agree) for t in traces]
    exact = [t.reply_ids == r.ids for t, r in zip(traces, references)]
    gap = [float(np.mean(np.subtract(r.logprobs, t.ref_logprobs))) for t, r in zip(traces, references)]
    first = [next((i for i, a in enumerate(t.ref_agree) if not a), len(t.ref_agree)) for t in traces]
    return {
        "top1_agreement": bootstrap(agree, seed),
        "greedy_exact": wilson(sum(exact), len(exact)),
        "loglik_gap": bootstrap(gap, seed),
        "first_divergence": bootstrap(first, seed),
    }


def latency(traces: Sequence[Trace]) -> dict[str, float]:
    """Milliseconds per token spent in OutgoingStates: decode steps (one token) and prefill."""
    decode = [s for t in traces for s in t.decode_seconds]
    prefill_tokens = sum(t.observed.prompt_len for t in traces)
    return {
        "decode_ms_per_token": 1e3 * float(np.mean(decode)) if decode else float("nan"),
        "prefill_ms_per_token": 1e3 * sum(t.prefill_seconds for t in traces) / max(prefill_tokens, 1),
    }


def gaussian_epsilon(sensitivity: float, sigma: float, delta: float = DELTA) -> float:
    """Per-token epsilon of the Gaussian mechanism: Δ·sqrt(2·ln(1.25/δ))/σ (inf without noise)."""
    if sigma <= 0:
        return math.inf
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / sigma
