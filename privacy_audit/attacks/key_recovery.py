"""Attack A: recover Q from the folded weights (orthogonal Procrustes), and read prompts by K/V lookup.

The core's first block holds W·diag(g)·Qᵀ (q, k, v, gate, up) and Q·W (o, down), where W, g
are the public weights of block k (k = edge-held layers, named in the core bundle). Stacking
them, Q = argmin_R ||R·M − N|| over orthogonal R, solved by one SVD: N·Mᵀ = U·S·Vᵀ, Q = U·Vᵀ.

The lookup needs no Q at all: RMSNorm is rotation-invariant, so the keys and values the
core computes from a received Q·x are W_kv·diag(g)·norm(x), those of the unrotated model.
For k = 0 the table of every vocabulary token's layer-0 K/V therefore reads each prompt token
back; for k > 0 the same plain table (public block k applied to a bare embedding) is what an
operator would try first, and edge-held layers are meant to defeat it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from privacy_audit.knowledge import Knowledge, PublicModel, nearest_l2
from privacy_audit.trace import Observed
from veil.model.decoder import DecoderStack
from veil.model.int8 import Int8Linear
from veil.model.linear import Linear


def _weight(projection: Linear | Int8Linear) -> torch.Tensor:
    """A projection's float weight: the audit loads the core bundle's stack in float32, as the bundle holds it."""
    assert isinstance(projection, Linear), "the audit reads a float stack, not an int8 one"
    return projection.weight


def _block_matrices(stack: DecoderStack) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_in [rows, d], M_out [d, cols]): the first block's input-side and output-side weights."""
    layer = stack.layers[0]
    m_in = torch.cat([_weight(layer.qkv), _weight(layer.gate_up)]).double()  # W·diag(g)·Qᵀ
    m_out = torch.cat([_weight(layer.o), _weight(layer.down)], dim=1).double()  # Q·W
    return m_in, m_out


def procrustes(public: PublicModel, core: DecoderStack) -> torch.Tensor:
    """Q̂ [d, d] float64 from the core bundle's first block and the matching public block."""
    k = core.spec.first_layer
    pub_in, pub_out = _block_matrices(public.stack(k, k + 1))
    fold_in, fold_out = _block_matrices(core)
    # fold_in = pub_in·Qᵀ  <=>  Q·pub_inᵀ = fold_inᵀ;  fold_out = Q·pub_out
    m = torch.cat([pub_in.T, pub_out], dim=1)
    n = torch.cat([fold_in.T, fold_out], dim=1)
    u, _, vh = torch.linalg.svd(n @ m.T)
    return u @ vh


def recovered_rotation(op: Knowledge) -> torch.Tensor:
    """Q̂ for this deployment, computed once and kept on the Knowledge."""
    if op.q_hat is None:
        op.q_hat = procrustes(op.public, op.core)
    return op.q_hat


def rotation_error(q_hat: torch.Tensor, q_true: torch.Tensor) -> float:
    """||Q̂ − Q||_F / ||Q||_F (scoring only: the harness reads the true Q from the edge bundle)."""
    q_true = q_true.double()
    return float((q_hat.double() - q_true).norm() / q_true.norm())


def _kv_weights(stack: DecoderStack) -> torch.Tensor:
    """[2·KV·hd, d] the key and value rows of the first block's fused projection."""
    rows = stack.q_rows
    return _weight(stack.layers[0].qkv)[rows:rows + 2 * stack.kv_rows]


def _kv(stack: DecoderStack, x: torch.Tensor, eps: float) -> torch.Tensor:
    """[N, d] block inputs -> [N, 2·KV·hd] pre-RoPE keys and values."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps) @ _kv_weights(stack).T


def kv_table(public: PublicModel, layer: int) -> torch.Tensor:
    """[V, 2·KV·hd] every vocabulary token's K/V at public block `layer`, taking the embedding as its input."""
    return _cached_table(public, layer)


@lru_cache(maxsize=4)
def _cached_table(public: PublicModel, layer: int) -> torch.Tensor:
    return _kv(public.stack(layer, layer + 1), public.embed, public.eps)


def lookup(op: Knowledge, observed: list[Observed]) -> list[list[int]]:
    """Prompt tokens by nearest K/V in the vocabulary table; uses the core's own weights, never Q."""
    table = kv_table(op.public, op.edge_layers)
    rows = torch.cat([o.received[:o.prompt_len] for o in observed])
    ids, _ = nearest_l2(_kv(op.core, rows, op.core.spec.rms_norm_eps), table)
    return [chunk.tolist() for chunk in ids[:, 0].split([o.prompt_len for o in observed])]


def recover(op: Knowledge, observed: Observed) -> list[int]:
    """One request's prompt tokens by attack A's lookup."""
    return lookup(op, [observed])[0]
