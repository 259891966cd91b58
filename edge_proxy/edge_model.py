"""The edge's share of the model: tokenizer, embedding, final norm and LM head, with Q folded in.

Q is applied once, at load: rows of the embedding table become Q·e (what the core expects),
and the LM head becomes W·diag(g)·Qᵀ. RMSNorm is rotation-invariant, so
logits = W·diag(g)·norm(Qᵀ·h') = (W·diag(g)·Qᵀ)·h'/rms(h'), and no per-token rotation is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cloaking.checkpoint import load_tokenizer
from cloaking.cloak import unseal_rotation
from cloaking.secretbox import KeySource
from edge_proxy.grammar import Grammars
from veil.bundle import (
    EDGE_LAYERS_SPEC,
    EDGE_LAYERS_WEIGHTS,
    EDGE_SEALED_Q,
    EDGE_TOKENIZER,
    EDGE_WEIGHTS,
    EdgeSpec,
    load_tensors,
    read_edge_spec,
)
from veil.errors import BundleError
from veil.model.decoder import DecoderStack
from veil.model.int8 import layer_type


class EdgeModel:
    """Rotated embedding lookup and rotated-state-to-logits, on the CPU: float32, or the head as int8
    (`edge.quantize`), as FBGEMM layers that read a quarter of the bytes (the head is the edge's per-token
    cost: 113 MB of float32 for SmolLM2)."""

    def __init__(self, spec: EdgeSpec, tokenizer: Any, embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: torch.Tensor, q: torch.Tensor, edge_stack: DecoderStack | None = None,
                 quantize: str = "none"):
        head_layer = layer_type(quantize, "edge.quantize")
        self.spec, self.tokenizer, self.quantize = spec, tokenizer, quantize
        self.edge_stack = edge_stack  # the first k blocks, folded with Q, when the edge holds some
        self.edge_layers = spec.edge_layers
        assert (edge_stack is None) == (spec.edge_layers == 0)
        d = spec.hidden_size
        self.embedding_rms = float(embed.double().pow(2).mean().sqrt())  # rotation-invariant; sets noise scale
        assert q.shape == (d, d) and embed.shape[1] == d and lm_head.shape[1] == d
        q64 = q.double()
        self.rotated_embed = (embed.double() @ q64.T).float().contiguous()  # [V, d]: row i is Q·e_i
        self.rotated_head = (lm_head.double() * norm.double()[None, :] @ q64.T).float().contiguous()  # [V, d]
        self.head = head_layer(self.rotated_head)
        self.eos_ids = frozenset(spec.eos_token_ids)
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)  # built on first use

    @classmethod
    def load(cls, bundle_dir: Path, key_source: KeySource, quantize: str = "none") -> "EdgeModel":
        bundle_dir = Path(bundle_dir)
        spec = read_edge_spec(bundle_dir)
        tensors = load_tensors(bundle_dir / EDGE_WEIGHTS)
        try:
            blob = (bundle_dir / EDGE_SEALED_Q).read_bytes()
        except OSError as exc:
            raise BundleError(f"edge bundle {bundle_dir} lacks its sealed rotation") from exc
        q = unseal_rotation(blob, key_source, spec.bundle_id)
        lm_head = tensors["embed"] if spec.tied_embeddings else tensors["lm_head"]
        tokenizer = load_tokenizer(bundle_dir / EDGE_TOKENIZER)
        stack = DecoderStack.load(bundle_dir, torch.device("cpu"), spec_name=EDGE_LAYERS_SPEC,
                                  weights_name=EDGE_LAYERS_WEIGHTS, quantize=quantize) if spec.edge_layers else None
        return cls(spec, tokenizer, tensors["embed"], tensors["norm"], lm_head, q, stack, quantize)

    @property
    def vocab_size(self) -> int:
        return self.rotated_embed.shape[0]

    def embed(self, ids: list[int]) -> torch.Tensor:
        """[n] token ids -> [n, d] rotated input states for the core."""
        return self.rotated_embed[torch.tensor(ids, dtype=torch.long)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[d] rotated residual state from the core -> [V] logits."""
        return self.logits_rows(hidden[None, :])[0]

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, d] rotated residual states -> [n, V] logits, in one GEMM."""
        h = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.spec.rms_norm_eps)
        return self.head(h)
