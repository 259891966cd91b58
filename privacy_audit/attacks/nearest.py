"""Attack B: de-rotate what the core receives with the Procrustes Q̂, then nearest embedding (L2, cosine).

The L2 neighbour is also the noise-likelihood maximiser: with x' = e + n, n ~ N(0, σ²I),
log p(x' | token v) = −||x' − e_v||² / 2σ² + const. `candidates` returns the top-M by that
likelihood for attack C. When the policy clips, the noise is centred on the clipped embedding.
"""

from __future__ import annotations

import dataclasses

import torch

from privacy_audit.attacks.key_recovery import recovered_rotation
from privacy_audit.knowledge import CHUNK_ROWS, Knowledge
from privacy_audit.trace import Observed


@dataclasses.dataclass(slots=True)
class Candidates:
    """Per received prompt position: the top-M tokens by noise likelihood and their squared distances."""

    ids: torch.Tensor  # [T, M], nearest first
    sqdist: torch.Tensor  # [T, M]
    cosine: torch.Tensor  # [T] the cosine nearest neighbour


def derotate(op: Knowledge, states: torch.Tensor) -> torch.Tensor:
    """[N, d] rotated states Q·x -> [N, d] x̂ = Q̂ᵀ·(Q·x) (row-vector form: x̂ = y·Q̂)."""
    q_hat = recovered_rotation(op)
    return (states.double() @ q_hat).float()


def candidates(op: Knowledge, observed: list[Observed], m: int = 1) -> list[Candidates]:
    """Top-m noise-likelihood candidates and the cosine neighbour for every prompt position."""
    x = derotate(op, torch.cat([o.received[:o.prompt_len] for o in observed]))
    means = op.noise_means
    sq = means.double().pow(2).sum(-1).float()
    scale = means.norm(dim=-1) / op.public.embed.norm(dim=-1).clamp_min(1e-12)  # clipping shrinks rows
    inv_norm = 1.0 / op.public.embed.norm(dim=-1).clamp_min(1e-12)
    ids, dists, cos = [], [], []
    for start in range(0, x.shape[0], CHUNK_ROWS):
        q = x[start:start + CHUNK_ROWS]
        dots = q @ op.public.embed.T  # one product serves both metrics
        d2 = q.pow(2).sum(-1, keepdim=True) - 2 * dots * scale[None, :] + sq[None, :]
        val, idx = torch.topk(d2, m, dim=-1, largest=False)
        ids.append(idx)
        dists.append(val.clamp_min(0))
        cos.append((dots * inv_norm[None, :]).argmax(-1))
    sizes = [o.prompt_len for o in observed]
    return [Candidates(i, d, c) for i, d, c in zip(torch.cat(ids).split(sizes), torch.cat(dists).split(sizes),
                                                    torch.cat(cos).split(sizes))]


def recover(op: Knowledge, observed: Observed, metric: str = "l2") -> list[int]:
    """One request's prompt tokens by attack B (metric 'l2' or 'cosine')."""
    c = candidates(op, [observed])[0]
    return (c.ids[:, 0] if metric == "l2" else c.cosine).tolist()
