"""Attack F: a wire observer, with neither the core bundle nor Q, reads tokens from vector norms.

A rotation preserves length: ||Q·e_v|| = ||e_v||, and the public embedding matrix gives every
token's length (48,536 of SmolLM2's 49,152 rows have a norm unique to 1e-6). So whoever sees
the step payloads (a TLS-terminating ingress, a packet capture, a debug dump) and knows the
public model matches each received vector's norm to the nearest embedding norm. Generated
tokens are fed back as the next step's input, so the reply leaks the same way. With noise,
E||e + n||² = ||e||² + d·σ², and the observer corrects for it. With edge-held layers the core
receives h_k, not an embedding, and this attack does not apply.
"""

from __future__ import annotations

import torch

from privacy_audit.knowledge import Knowledge, WireKnowledge
from privacy_audit.trace import Observed


def match(op: Knowledge | WireKnowledge, rows: torch.Tensor) -> torch.Tensor:
    """[N, d] received vectors -> [N] token ids whose (clipped) embedding norm is nearest."""
    norms = op.noise_means.double().norm(dim=-1)
    order = torch.argsort(norms)
    table = norms[order]
    d = rows.shape[-1]
    seen = (rows.double().pow(2).sum(-1) - d * op.sigma ** 2).clamp_min(0).sqrt()
    right = torch.searchsorted(table, seen).clamp(max=len(table) - 1)
    left = (right - 1).clamp(min=0)
    pick = torch.where((table[left] - seen).abs() <= (table[right] - seen).abs(), left, right)
    return order[pick]


def prompts(op: Knowledge | WireKnowledge, observed: list[Observed]) -> list[list[int]]:
    """Each request's prompt tokens from the norms of its prefill."""
    rows = torch.cat([o.received[:o.prompt_len] for o in observed])
    return [c.tolist() for c in match(op, rows).split([o.prompt_len for o in observed])]


def replies(op: Knowledge | WireKnowledge, observed: list[Observed]) -> list[list[int]]:
    """Each request's generated tokens from the norms of the decode steps (all but the last token,
    which is never sent back)."""
    out = []
    for o in observed:
        fed = o.received[o.prompt_len:]
        out.append(match(op, fed).tolist() if fed.shape[0] else [])
    return out
