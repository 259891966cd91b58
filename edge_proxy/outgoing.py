"""What leaves the edge for each token: embed -> (noise) -> (edge-held blocks) -> rotated states.

Noise is drawn in the rotated basis: for Gaussian n, Q·n has the same distribution as n, and
clipping is rotation-invariant, so Q·clip(x) + n' equals Q·(clip(x) + n) in law.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import struct

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
    """One request's outgoing stream; keeps the edge-held blocks' KV cache between calls, and every row
    it has sent, so that a re-prefill resends the very same rows (a fresh noise draw for the same
    tokens would hand the core operator a second independent sample to average).

    For the same reason each row's noise is a function of the request's noise key, its position and its
    token: a position sent again with the same token after other tokens were tried there (rejected
    draft tokens, another choice of the same prompt) carries the draw it carried the first time."""

    def __init__(self, model: EdgeModel, noise: NoiseSpec, generator: torch.Generator | None = None,
                 span_noise: SpanNoise | None = None):
        self.model, self.noise, self.span_noise = model, noise, span_noise
        self.sigma = noise.rho * model.embedding_rms
        self.span_sigma = 0.0 if span_noise is None else max(self.sigma, span_noise.rho * model.embedding_rms)
        # fresh per request; tests pass a seeded generator
        generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        self._noise_key = bytes(torch.randint(0, 256, (32,), generator=generator).tolist())
        self._row_generator = torch.Generator()
        stack = model.edge_stack
        self.session = None if stack is None else stack.new_session(model.spec.max_positions)
        self._ids: list[int] = []  # the token at each position sent so far
        self._rows = torch.empty((0, model.spec.hidden_size))  # [capacity, d]; rows [0, len(_ids)) are valid

    def __call__(self, ids: list[int], offset: int) -> torch.Tensor:
        """[n] token ids at positions offset.. -> [n, d] rotated states for the core.

        Positions already sent with the same token come back exactly as sent; the rest are new."""
        assert 0 <= offset <= len(self._ids), "positions are sent in order"
        same = 0
        while same < len(ids) and offset + same < len(self._ids) and self._ids[offset + same] == ids[same]:
            same += 1
        start = offset + same
        fresh = self._fresh(ids[same:], start) if same < len(ids) else None
        del self._ids[start:]  # a different token at `start` (speculation rejected) invalidates what follows
        if fresh is not None:
            self._keep(ids[same:], fresh)
        return self._rows[offset : offset + len(ids)].clone()

    def _fresh(self, ids: list[int], offset: int) -> torch.Tensor:
        x = self.model.embed(ids)
        if self.noise.clip is not None:
            norms = x.norm(dim=-1, keepdim=True)
            x = x * torch.clamp(self.noise.clip / norms, max=1.0)
        sigma = self._sigmas(len(ids), offset)
        if sigma is not None:
            x = x + sigma * self._noise(ids, offset)
        if self.session is None:
            return x
        stack = self.model.edge_stack
        assert stack is not None
        return stack.step(x, [self.session.begin(offset, len(ids))])

    def _noise(self, ids: list[int], offset: int) -> torch.Tensor:
        """[n, d] standard normal rows, each drawn from a seed keyed by (position, token)."""
        rows = []
        for i, token in enumerate(ids):
            seed = hashlib.blake2b(struct.pack("<qq", offset + i, token), key=self._noise_key, digest_size=8).digest()
            self._row_generator.manual_seed(int.from_bytes(seed, "little") >> 1)
            rows.append(torch.randn(self.model.spec.hidden_size, generator=self._row_generator))
        return torch.stack(rows)

    def _keep(self, ids: list[int], rows: torch.Tensor) -> None:
        end = len(self._ids) + len(ids)
        if end > self._rows.shape[0]:  # grow by doubling: decode appends one row per token
            grown = torch.empty((max(end, 2 * self._rows.shape[0], 64), rows.shape[1]), dtype=rows.dtype)
            grown[: len(self._ids)] = self._rows[: len(self._ids)]
            self._rows = grown
        self._rows[len(self._ids) : end] = rows
        self._ids += ids

    def _sigmas(self, n: int, offset: int) -> torch.Tensor | float | None:
        """Noise scale per row ([n, 1]), a scalar, or None for no noise."""
        span = self.span_noise
        marked = [] if span is None else [i for i in range(n) if offset + i in span.positions]
        if not marked:
            return self.sigma if self.sigma > 0 else None
        sigma = torch.full((n, 1), self.sigma)
        sigma[marked] = self.span_sigma
        return sigma
