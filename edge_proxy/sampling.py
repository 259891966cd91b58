"""Sampling at the edge (the core never sees logits): temperature, top-p, penalties, logit bias, seed."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import torch

from edge_proxy.compute import zeros


@dataclasses.dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        assert 0.0 <= self.temperature <= 2.0 and 0.0 <= self.top_p <= 1.0


class Sampler:
    """Per-request sampler; with a seed its draws repeat exactly on the same machine."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else secrets.randbits(63)
        )
        penalised = bool(params.presence_penalty or params.frequency_penalty)
        # made on the event loop: filled by NumPy (see edge_proxy.compute)
        self.counts = zeros(vocab_size, torch.float64) if penalised else None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            self.bias = (ids, torch.tensor(list(params.logit_bias.values()), dtype=torch.float64))

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.counts is None:
            return logits
        # float64 (exact for float32 logits): bias and penalties on logits near float32's limit stay finite
        logits = logits.to(torch.float64, copy=True)  # a copy: the caller's logits are never changed
        if self.bias is not None:
            logits.index_add_(0, self.bias[0], self.bias[1])
        if self.counts is not None:
            p = self.params
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        return logits

    def sample(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """[V] logits -> next token id; `allowed` ([V] bool, a grammar's mask) leaves only those tokens possible."""
        logits = self._adjust(logits)  # unadjusted greedy stays on the float32 logits: nothing to convert
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))  # a new tensor: the caller's logits stay as they are
        p = self.params
        if p.temperature == 0.0:
            # NumPy's argmax keeps torch's rule (the first maximum; a NaN counts as the largest) and takes 4 µs
            # for SmolLM2's 49,152 logits on one thread, where torch's reduction takes 72: every stream pays it
            # per token, in the head's tick, where the other streams wait for it
            token = int(np.argmax(logits.numpy()))
        else:
            # shifted so the largest is 0 before scaling: any admitted temperature, however small, gives
            # exponents in [-inf, 0], never inf - inf = nan
            logits = logits.double()
            probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
            if p.top_p < 1.0:
                probs = self._top_p(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.counts is not None:
            self.counts[token] += 1
        return token

    @staticmethod
    def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < top_p  # the smallest prefix reaching top_p; always the first
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        return filtered / filtered.sum()
