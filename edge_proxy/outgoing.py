"""What leaves the edge for each token: embed -> (noise) -> (edge-held blocks) -> rotated states.

Noise is drawn in the rotated basis: for Gaussian n, Q·n has the same distribution as n, and
clipping is rotation-invariant, so Q·clip(x) + n' equals Q·(clip(x) + n) in law.
"""

from __future__ import annotations

import dataclasses
import secrets

import torch

from edge_proxy.edge_model import EdgeModel


@dataclasses.dataclass(frozen=True, slots=True)
class NoiseSpec:
    rho: float = 0.0  # sigma = rho * rms(embedding matrix)
    clip: float | None = None  # L2 bound applied to each embedding before the noise (bounds sensitivity to 2*clip)

    def __post_init__(self) -> None:
        assert self.rho >= 0 and (self.clip is None or self.clip > 0)


@dataclasses.dataclass(frozen=True, slots=True)
class SpanNoise:
    """Heavier noise on chosen prompt positions (protect rules with protection=noise)."""

    positions: frozenset[int]
    rho: float  # these positions get sigma = max(request sigma, rho * rms(embedding matrix))

    def __post_init__(self) -> None:
        assert self.rho > 0


class OutgoingStates:
    """One request's outgoing stream; keeps the edge-held blocks' KV cache between calls."""

    def __init__(self, model: EdgeModel, noise: NoiseSpec, generator: torch.Generator | None = None,
                 span_noise: SpanNoise | None = None):
        self.model, self.noise, self.span_noise = model, noise, span_noise
        self.sigma = noise.rho * model.embedding_rms
        self.span_sigma = 0.0 if span_noise is None else max(self.sigma, span_noise.rho * model.embedding_rms)
        # fresh per request; tests pass a seeded generator
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        stack = model.edge_stack
        self.session = None if stack is None else stack.new_session(model.spec.max_positions)

    def __call__(self, ids: list[int], offset: int) -> torch.Tensor:
        """[n] token ids at positions offset.. -> [n, d] rotated states for the core."""
        x = self.model.embed(ids)
        if self.noise.clip is not None:
            norms = x.norm(dim=-1, keepdim=True)
            x = x * torch.clamp(self.noise.clip / norms, max=1.0)
        sigma = self._sigmas(len(ids), offset)
        if sigma is not None:
            x = x + sigma * torch.randn(x.shape, generator=self.generator)
        if self.session is None:
            return x
        stack, n = self.model.edge_stack, len(ids)
        assert stack is not None
        # a re-prefill (offset 0) rolls the edge-held blocks' cache back too
        return stack.step(x, [self.session.begin(offset, n)])

    def _sigmas(self, n: int, offset: int) -> torch.Tensor | float | None:
        """Noise scale per row ([n, 1]), a scalar, or None for no noise."""
        span = self.span_noise
        marked = [] if span is None else [i for i in range(n) if offset + i in span.positions]
        if not marked:
            return self.sigma if self.sigma > 0 else None
        sigma = torch.full((n, 1), self.sigma)
        sigma[marked] = self.span_sigma
        return sigma
