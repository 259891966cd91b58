"""The cloaked decoder stack: Llama-family blocks with norm gains folded in and Q applied.

Tokens of several sessions run together: projections and MLPs see one flat [N, d] batch,
attention runs per session against its own cache. `step` is the only way in: it runs the
blocks over segments that `Session.begin` checked and commits each session's new length.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from veil.bundle import CORE_SPEC, CORE_WEIGHTS, CoreSpec, load_tensors, read_core_spec
from veil.errors import BundleError
from veil.model.kv import Segment, Session
from veil.model.linear import Linear


@dataclasses.dataclass(slots=True)
class Layer:
    qkv: Linear  # [(H + 2*KV) * hd, d]
    o: Linear  # [d, H * hd]
    gate_up: Linear  # [2 * I, d]
    down: Linear  # [d, I]
    q_norm: torch.Tensor | None  # [hd]
    k_norm: torch.Tensor | None
    window: int | None


def _cache(seg: Segment) -> Session:
    """The segment's KV cache: this stack writes keys and values, so its sessions are `Session`s."""
    assert isinstance(seg.session, Session), "the decoder stack runs on KV-cache sessions"
    return seg.session


def _cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    assert all(p is not None for p in parts), "biases must be all present or all absent"
    return torch.cat(parts)  # type: ignore[arg-type]


class DecoderStack:
    """Runs all decoder layers of a core bundle; owns no sessions, writes into theirs."""

    def __init__(self, spec: CoreSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.groups = spec.num_heads // spec.num_kv_heads
        self.q_rows = spec.num_heads * spec.head_dim
        self.kv_rows = spec.num_kv_heads * spec.head_dim

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            t = tensors.get(name)
            if t is None and required:
                raise BundleError(f"core bundle lacks tensor {name}")
            return None if t is None else t.to(device=device, dtype=dtype)

        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            self.layers.append(Layer(
                qkv=Linear(torch.cat([get(p + x + ".weight") for x in "qkv"]),  # type: ignore[misc]
                           _cat_opt([get(p + x + ".bias", False) for x in "qkv"])),
                o=Linear(get(p + "o.weight"), get(p + "o.bias", False)),  # type: ignore[arg-type]
                gate_up=Linear(torch.cat([get(p + "gate.weight"), get(p + "up.weight")]),  # type: ignore[list-item]
                               _cat_opt([get(p + "gate.bias", False), get(p + "up.bias", False)])),
                down=Linear(get(p + "down.weight"), get(p + "down.bias", False)),  # type: ignore[arg-type]
                q_norm=get(p + "q_norm.weight", False),
                k_norm=get(p + "k_norm.weight", False),
                window=spec.sliding_windows[i],
            ))
        self._check_spec(tensors)
        inv_freq = tensors.get("rope.inv_freq")
        if inv_freq is None:
            raise BundleError("core bundle lacks tensor rope.inv_freq")
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    def _check_spec(self, tensors: dict[str, torch.Tensor]) -> None:
        """The spec's shape flags must describe the tensors the bundle really holds."""
        s, first = self.spec, "layers.0."
        facts = {
            "attention_bias": first + "q.bias" in tensors,
            "o_bias": first + "o.bias" in tensors,
            "mlp_bias": first + "down.bias" in tensors,
            "qk_norm": first + "q_norm.weight" in tensors,
        }
        for name, present in facts.items():
            if getattr(s, name) != present:
                raise BundleError(f"core bundle spec says {name}={getattr(s, name)} but its tensors disagree")
        if s.num_layers and self.layers[0].down.weight.shape[1] != s.intermediate_size:
            raise BundleError("core bundle spec's intermediate_size does not match its tensors")

    def new_session(self, limit: int | None = None, capacity: int = 0) -> Session:
        """An empty KV cache shaped for this stack, holding at most `limit` positions (default: the model's)."""
        s = self.spec
        return Session(s.num_layers, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device,
                       limit=s.max_positions if limit is None else limit, capacity=capacity)

    @classmethod
    def load(cls, bundle_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32, *,
             spec_name: str = CORE_SPEC, weights_name: str = CORE_WEIGHTS) -> "DecoderStack":
        spec = read_core_spec(bundle_dir, spec_name)
        return cls(spec, load_tensors(Path(bundle_dir) / weights_name), device, dtype)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, hd/2] -> cos, sin [N, 1, hd], computed in float32 as the reference model does
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.spec.rope_attention_scaling
        return (emb.cos() * scale).to(self.dtype)[:, None, :], (emb.sin() * scale).to(self.dtype)[:, None, :]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _mask(self, seg: Segment, window: int | None) -> torch.Tensor | None:
        """Boolean [n, T] mask (True = attend), or None when every cached key is visible."""
        total = seg.end
        if seg.n == 1 and (window is None or total <= window):
            return None
        q_pos = torch.arange(seg.offset, total, device=self.device)[:, None]
        k_pos = torch.arange(total, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
        return mask

    def _attend(self, q: torch.Tensor, layer_idx: int, seg: Segment, window: int | None) -> torch.Tensor:
        # q [n, H, hd] -> out [n, H * hd]; query heads are folded into the length axis per KV head
        s, n, g, hd = self.spec, seg.n, self.groups, self.spec.head_dim
        kv = _cache(seg)
        keys = kv.k[layer_idx, :, : seg.end]  # [KV, T, hd]
        values = kv.v[layer_idx, :, : seg.end]
        qg = q.view(n, s.num_kv_heads, g, hd).permute(1, 2, 0, 3).reshape(s.num_kv_heads, g * n, hd)
        mask = self._mask(seg, window)
        if mask is not None:
            mask = mask.repeat(g, 1)  # row r = group * n + i
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return out.view(s.num_kv_heads, g, n, hd).permute(2, 0, 1, 3).reshape(n, s.num_heads * hd)

    def step(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x [N, d] rotated inputs, the segments' rows in order -> [N, d] rotated residual stream after the
        last block; each session then holds its segment (a failed forward commits nothing)."""
        assert x.dim() == 2 and x.shape[0] == sum(seg.n for seg in segments), "rows must match the segments"
        assert len({id(seg.session) for seg in segments}) == len(segments), "one segment per session per step"
        out = self._forward(x, segments)
        for seg in segments:
            seg.session.commit(seg)
        return out

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        s = self.spec
        assert x.shape[1] == s.hidden_size
        starts = [0]
        for seg in segments[:-1]:
            starts.append(starts[-1] + seg.n)
        x = x.to(device=self.device, dtype=self.dtype)
        positions = torch.cat([torch.arange(seg.offset, seg.end, device=self.device) for seg in segments])
        cos, sin = self.rope(positions)
        hd, eps = s.head_dim, s.rms_norm_eps
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden_size,), eps=eps)
            qkv = layer.qkv(h)
            q = qkv[:, : self.q_rows].view(-1, s.num_heads, hd)
            k = qkv[:, self.q_rows : self.q_rows + self.kv_rows].view(-1, s.num_kv_heads, hd)
            v = qkv[:, self.q_rows + self.kv_rows :].view(-1, s.num_kv_heads, hd)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (hd,), layer.q_norm, eps)
                k = F.rms_norm(k, (hd,), layer.k_norm, eps)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            outs = []
            for seg, start in zip(segments, starts):
                rows = slice(start, start + seg.n)
                span = slice(seg.offset, seg.end)
                kv = _cache(seg)
                kv.k[li, :, span] = k[rows].transpose(0, 1)
                kv.v[li, :, span] = v[rows].transpose(0, 1)
                outs.append(self._attend(q[rows], li, seg, layer.window))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + layer.o(attn)
            h = F.rms_norm(x, (s.hidden_size,), eps=eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x
