"""What the core operator knows: the public base model, the deployed core bundle and the noise policy.

Everything here is available to the attacker; nothing reads the edge bundle or Q.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import torch
import torch.nn.functional as F

from cloaking.checkpoint import Checkpoint
from cloaking.cloak import core_spec_for, fold_layer
from edge_proxy.outgoing import NoiseSpec
from veil.model.decoder import DecoderStack

CHUNK_ROWS = 1024  # rows per [rows, V] score block: 1024 x 49152 float32 is 200 MB


class PublicModel:
    """The public base checkpoint as float32 tensors, with unrotated decoder stacks on demand."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.model, self.tokenizer = ckpt, ckpt.model, ckpt.tokenizer
        self.sd = {k: v.detach() for k, v in ckpt.model.state_dict().items()}
        cfg = ckpt.model.config
        self.num_layers = cfg.num_hidden_layers
        self.eps = float(cfg.rms_norm_eps)
        self.embed = self.sd["model.embed_tokens.weight"].float().contiguous()  # [V, d]
        self.norm = self.sd["model.norm.weight"].float()
        head = self.sd.get("lm_head.weight", self.sd["model.embed_tokens.weight"])
        self.head = (head.float() * self.norm[None, :]).contiguous()  # final-norm gain folded in: [V, d]
        self.embedding_rms = float(self.embed.double().pow(2).mean().sqrt())
        self._stacks: dict[tuple[int, int], DecoderStack] = {}

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]

    def stack(self, first: int = 0, end: int | None = None) -> DecoderStack:
        """Public blocks [first, end) as a DecoderStack with Q = I (the unsplit model's arithmetic)."""
        end = self.num_layers if end is None else end
        if (first, end) not in self._stacks:
            eye = torch.eye(self.hidden_size, dtype=torch.float64)
            tensors: dict[str, torch.Tensor] = {}
            for i in range(first, end):
                tensors.update(fold_layer(self.sd, i, eye, as_index=i - first))
            tensors["rope.inv_freq"] = self.model.model.rotary_emb.inv_freq.detach().float()
            spec = core_spec_for(self.model, "public", first, end)
            self._stacks[(first, end)] = DecoderStack(spec, tensors, torch.device("cpu"), torch.float32)
        return self._stacks[(first, end)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d] unrotated residual states -> [N, V] logits (final norm + LM head)."""
        return F.linear(F.rms_norm(hidden.float(), (self.hidden_size,), eps=self.eps), self.head)

    @cached_property
    def embed_sqnorm(self) -> torch.Tensor:
        return self.embed.double().pow(2).sum(-1).float()

    @cached_property
    def max_embedding_distance(self) -> float:
        """max_ij ||e_i − e_j||, exactly. With r = distance to the mean, ||e_i − e_j|| <= r_i + r_j, so only
        rows with r_i + max r above the running best need a scan (about a hundred of 49,152 here)."""
        e = self.embed.double()
        r = (e - e.mean(0)).norm(dim=-1)
        order = torch.argsort(r, descending=True)
        r_sorted = r[order]
        best = float((e - e[order[0]]).norm(dim=-1).max())
        for i in range(len(order)):
            if r_sorted[i] + r_sorted[0] < best:
                break
            reach = int((r_sorted + r_sorted[i] >= best).sum())  # partners that could still beat it
            best = max(best, float((e[order[:reach]] - e[order[i]]).norm(dim=-1).max()))
        return best

    @cached_property
    def median_embedding_norm(self) -> float:
        return float(self.embed_sqnorm.sqrt().median())


@dataclasses.dataclass
class Knowledge:
    """The operator's view of one deployment: public weights, the core bundle it runs, the noise policy."""

    public: PublicModel
    core: DecoderStack
    noise: NoiseSpec
    q_hat: torch.Tensor | None = None  # attack A's Procrustes estimate, once computed

    @property
    def sigma(self) -> float:
        return self.noise.rho * self.public.embedding_rms  # the policy is public: sigma = rho * rms(E)

    @property
    def edge_layers(self) -> int:
        return self.core.spec.first_layer  # the core bundle says which block it starts at

    @cached_property
    def noise_means(self) -> torch.Tensor:
        """[V, d] the centre of the noise for each token: its embedding, clipped as the policy clips."""
        return clipped_embeddings(self.public, self.noise)


@dataclasses.dataclass
class WireKnowledge:
    """An on-path observer's view of one deployment: the public model and the deployment's public policy
    (noise ρ and clip, edge-held layers k), and whatever it records on the wire. No core bundle, no Q."""

    public: PublicModel
    noise: NoiseSpec
    edge_layers: int

    @property
    def sigma(self) -> float:
        return self.noise.rho * self.public.embedding_rms

    @cached_property
    def noise_means(self) -> torch.Tensor:
        return clipped_embeddings(self.public, self.noise)


def clipped_embeddings(public: PublicModel, noise: NoiseSpec) -> torch.Tensor:
    """[V, d] each token's embedding, clipped to the policy's L2 bound (the centre of its noise)."""
    e = public.embed
    if noise.clip is None:
        return e
    return e * torch.clamp(noise.clip / e.norm(dim=-1, keepdim=True), max=1.0)


def nearest_l2(queries: torch.Tensor, table: torch.Tensor, k: int = 1,
               table_sqnorm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [N, m], table [V, m] -> (ids [N, k], squared distances [N, k]), nearest first."""
    sq = table.pow(2).sum(-1) if table_sqnorm is None else table_sqnorm
    ids, dists = [], []
    for start in range(0, queries.shape[0], CHUNK_ROWS):
        q = queries[start:start + CHUNK_ROWS].float()
        d2 = q.pow(2).sum(-1, keepdim=True) - 2 * q @ table.T + sq[None, :]
        val, idx = torch.topk(d2, k, dim=-1, largest=False)
        ids.append(idx)
        dists.append(val.clamp_min(0))
    if not ids:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(ids), torch.cat(dists)
