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
from veil.errors import BundleError, ConfigError
from veil.model import int8_block
from veil.model.int8 import Int8Args, Int8Linear, layer_type
from veil.model.kv import KVPool, PooledSession, Segment, Session
from veil.model.linear import Linear


@dataclasses.dataclass(slots=True)
class Layer:
    qkv: Linear | Int8Linear  # [(H + 2*KV) * hd, d]
    o: Linear | Int8Linear  # [d, H * hd]
    gate_up: Linear | Int8Linear  # [2 * I, d]
    down: Linear | Int8Linear  # [d, I]
    q_norm: torch.Tensor | None  # [hd]
    k_norm: torch.Tensor | None
    window: int | None


def _cache(seg: Segment) -> Session:
    """The segment's KV cache: this stack writes keys and values, so its sessions are `Session`s."""
    assert isinstance(seg.session, Session), "the decoder stack runs on KV-cache sessions"
    return seg.session


def _script_args(projection: Linear | Int8Linear) -> Int8Args:
    """What int8_block's functions take of a projection of an int8 stack."""
    assert isinstance(projection, Int8Linear), "only an int8 stack runs the scripted blocks"
    return projection.script_args


def _cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    assert all(p is not None for p in parts), "biases must be all present or all absent"
    return torch.cat(parts)  # type: ignore[arg-type]


class DecoderStack:
    """Runs all decoder layers of a core bundle; owns no sessions, writes into theirs."""

    def __init__(self, spec: CoreSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 quantize: str = "none"):
        """`quantize` int8 holds the four projections of every block as `Int8Linear` (a float32 CPU stack only)."""
        self.spec, self.device, self.dtype, self.quantize = spec, device, dtype, quantize
        project = layer_type(quantize, "quantize")
        if project is Int8Linear and (device.type != "cpu" or dtype != torch.float32):
            raise ConfigError("core.quantize int8 runs on a CPU with core.dtype float32 (or auto); "
                              "on a GPU, core.dtype bfloat16 halves the weights instead")
        # int8 blocks run their halves around attention, and a lone decode row its whole layer loop, as TorchScript
        # functions (int8_block); False runs the eager methods below instead, the same ops (the tests compare them)
        self.script_int8 = project is Int8Linear
        self.groups = spec.num_heads // spec.num_kv_heads
        self._heads = [spec.num_heads, spec.num_kv_heads, spec.head_dim]  # the scripted functions' [H, KV, hd]
        self.q_rows = spec.num_heads * spec.head_dim
        self.kv_rows = spec.num_kv_heads * spec.head_dim
        # a lone decode row sees every cached key in every layer while the cache is no longer than this
        self.shortest_window = min((w for w in spec.sliding_windows if w is not None), default=None)

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            t = tensors.get(name)
            if t is None and required:
                raise BundleError(f"core bundle lacks tensor {name}")
            return None if t is None else t.to(device=device, dtype=dtype)

        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            self.layers.append(Layer(
                qkv=project(torch.cat([get(p + x + ".weight") for x in "qkv"]),  # type: ignore[misc]
                            _cat_opt([get(p + x + ".bias", False) for x in "qkv"])),
                o=project(get(p + "o.weight"), get(p + "o.bias", False)),  # type: ignore[arg-type]
                gate_up=project(torch.cat([get(p + "gate.weight"), get(p + "up.weight")]),  # type: ignore[list-item]
                                _cat_opt([get(p + "gate.bias", False), get(p + "up.bias", False)])),
                down=project(get(p + "down.weight"), get(p + "down.bias", False)),  # type: ignore[arg-type]
                q_norm=get(p + "q_norm.weight", False),
                k_norm=get(p + "k_norm.weight", False),
                window=spec.sliding_windows[i],
            ))
        self._check_spec(tensors)
        self._int8_blocks: list[int8_block.BlockArgs] = [
            (_script_args(b.qkv), _script_args(b.o), _script_args(b.gate_up), _script_args(b.down), b.q_norm, b.k_norm)
            for b in self.layers] if self.script_int8 else []
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
        if s.num_layers and self.layers[0].down.in_features != s.intermediate_size:
            raise BundleError("core bundle spec's intermediate_size does not match its tensors")

    def new_session(self, limit: int | None = None, capacity: int = 0) -> Session:
        """An empty KV cache shaped for this stack, holding at most `limit` positions (default: the model's)."""
        s = self.spec
        return Session(s.num_layers, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device,
                       limit=s.max_positions if limit is None else limit, capacity=capacity)

    def new_pool(self, slots: int, limit: int) -> KVPool:
        """A KV pool shaped for this stack: `slots` sessions of at most `limit` positions each."""
        s = self.spec
        return KVPool(slots, s.num_layers, s.num_kv_heads, s.head_dim, limit=limit, dtype=self.dtype,
                      device=self.device)

    @classmethod
    def load(cls, bundle_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32, *,
             spec_name: str = CORE_SPEC, weights_name: str = CORE_WEIGHTS, quantize: str = "none") -> "DecoderStack":
        spec = read_core_spec(bundle_dir, spec_name)
        return cls(spec, load_tensors(Path(bundle_dir) / weights_name), device, dtype, quantize)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] positions -> cos and signed sin [N, 1, hd], computed in float32 as the reference model does; sin's
        first half comes negated, as `apply_rope` takes it."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.spec.rope_attention_scaling
        sin = (emb.sin() * scale).to(self.dtype)
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return (emb.cos() * scale).to(self.dtype)[:, None, :], signed[:, None, :]

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [N, heads, hd] -> x·cos + rotate_half(x)·sin, as the reference model computes it (cos and signed_sin
        from `rope`), in four ops
        instead of eight: rotate_half(x) = [-x2, x1] becomes [x2, x1] (the halves swapped) times sin with
        the sign moved onto it, and (-a)·b = a·(-b) exactly, so the result is the same bit for bit."""
        turned = x.roll(x.shape[-1] // 2, -1)  # [x2, x1]: the halves swapped
        return x * cos + turned * signed_sin

    def _mask(self, seg: Segment, window: int | None) -> torch.Tensor | None:
        """Boolean [n, T] mask (True = attend), or None when every cached key is visible."""
        if self._sees_every_key(seg, window):
            return None
        total = seg.end
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
        # 4-D [1, KV, rows, hd]: the shape torch's fused CPU attention takes (3-D falls back to the math path)
        out = F.scaled_dot_product_attention(qg[None], keys[None], values[None], attn_mask=mask)
        return out.view(s.num_kv_heads, g, n, hd).permute(2, 0, 1, 3).reshape(n, s.num_heads * hd)

    @staticmethod
    def _sees_every_key(seg: Segment, window: int | None) -> bool:
        """Whether the segment is one decode row that sees every cached key under `window` (no mask needed)."""
        return seg.n == 1 and (window is None or seg.end <= window)

    def _one_row(self, seg: Segment) -> bool:
        """Whether `_attend_one_row` computes this segment's attention: a row that needs no mask in any layer."""
        return self._sees_every_key(seg, self.shortest_window)

    def _attend_one_row(self, qkv: torch.Tensor, li: int, seg: Segment) -> torch.Tensor:
        """`_write_and_attend` for a batch of one decode row, in five torch calls instead of about twenty (a
        step of a small model on a CPU is bound by such calls): the same attention call on the same values.
        qkv [1, (H + 2 KV) * hd] -> [1, H * hd]."""
        s, kv = self.spec, _cache(seg)
        row = qkv[0]
        new = row[self.q_rows :].view(2, s.num_kv_heads, s.head_dim)  # this position's keys, then its values
        if isinstance(kv, PooledSession):
            kv.kv[:, li, :, seg.offset] = new
        else:
            kv.k[li, :, seg.offset], kv.v[li, :, seg.offset] = new
        q = row[: self.q_rows].view(1, s.num_kv_heads, self.groups, s.head_dim)
        keys, values = kv.k[li : li + 1, :, : seg.end], kv.v[li : li + 1, :, : seg.end]  # [1, KV, T, hd]
        return F.scaled_dot_product_attention(q, keys, values).view(1, self.q_rows)

    def _write_and_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, li: int, seg: Segment,
                          start: int, window: int | None) -> torch.Tensor:
        """One segment: write its keys and values into its cache, attend over it -> [n, H * hd]."""
        rows = slice(start, start + seg.n)
        span = slice(seg.offset, seg.end)
        kv = _cache(seg)
        kv.k[li, :, span] = k[rows].transpose(0, 1)
        kv.v[li, :, span] = v[rows].transpose(0, 1)
        return self._attend(q[rows], li, seg, window)

    def _rope_into(self, src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """dst = apply_rope(src), written into dst (a view of the qkv output): on a CPU the same ops, bit for bit;
        on a GPU the last multiply and the add fused (one small kernel fewer per layer; FMA rounding)."""
        turned = src.roll(src.shape[-1] // 2, -1)  # the halves swapped, as in apply_rope
        if src.device.type == "cuda":
            torch.addcmul(src * cos, turned, sin, out=dst)
        else:
            torch.add(src * cos, turned * sin, out=dst)

    def attention_inputs(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """A block's first half: x [N, d] -> its qkv output [N, (H + 2 KV) * hd] with the query and key heads
        rotated in place, so that each row's key and value heads lie side by side (`heads` splits it)."""
        s = self.spec
        hd, eps = s.head_dim, s.rms_norm_eps
        if self.script_int8:
            return int8_block.attention_inputs(x, cos, sin, _script_args(layer.qkv), layer.q_norm, layer.k_norm,
                                               self._heads, eps)
        qkv = layer.qkv(F.rms_norm(x, (s.hidden_size,), eps=eps))
        if layer.q_norm is None:  # query and key heads rotated in one call
            qk = qkv[:, : self.q_rows + self.kv_rows].view(-1, s.num_heads + s.num_kv_heads, hd)
            self._rope_into(qk, qk, cos, sin)
            return qkv
        q, k, _ = self.heads(qkv)
        self._rope_into(F.rms_norm(q, (hd,), layer.q_norm, eps), q, cos, sin)
        self._rope_into(F.rms_norm(k, (hd,), layer.k_norm, eps), k, cos, sin)
        return qkv

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of a qkv output: q [N, H, hd], k and v [N, KV, hd]."""
        s, hd = self.spec, self.spec.head_dim
        q, k, v = qkv.split((self.q_rows, self.kv_rows, self.kv_rows), dim=1)
        return q.view(-1, s.num_heads, hd), k.view(-1, s.num_kv_heads, hd), v.view(-1, s.num_kv_heads, hd)

    def block_output(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """A block's second half: the residual stream x [N, d] plus attention's output [N, H * hd], then the MLP."""
        if self.script_int8:
            return int8_block.block_output(x, attn, _script_args(layer.o), _script_args(layer.gate_up),
                                           _script_args(layer.down), self.spec.rms_norm_eps)
        x = layer.o.residual(x, attn)  # a new tensor: the x passed in may be the caller's
        gate, up = layer.gate_up(F.rms_norm(x, (self.spec.hidden_size,), eps=self.spec.rms_norm_eps)).chunk(2, dim=-1)
        return layer.down.residual(x, F.silu(gate) * up, in_place=True)

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
        x = x.to(device=self.device, dtype=self.dtype)
        positions = torch.cat([torch.arange(seg.offset, seg.end, device=self.device) for seg in segments])
        cos, sin = self.rope(positions)
        alone = len(segments) == 1 and self._one_row(segments[0])
        if alone and self.script_int8:
            seg, kv = segments[0], _cache(segments[0])
            return int8_block.one_row(x, cos, sin, self._int8_blocks, kv.k, kv.v, seg.offset, self._heads,
                                      s.rms_norm_eps)
        starts = [0]
        for seg in segments[:-1]:
            starts.append(starts[-1] + seg.n)
        pooled = PooledDecode.of(segments, starts, self)
        for li, layer in enumerate(self.layers):
            qkv = self.attention_inputs(layer, x, cos, sin)
            if alone:
                attn = self._attend_one_row(qkv, li, segments[0])
            else:
                attn = self._attend_batch(qkv, li, layer.window, segments, starts, pooled)
            x = self.block_output(layer, x, attn)
        return x

    def _attend_batch(self, qkv: torch.Tensor, li: int, window: int | None, segments: Sequence[Segment],
                      starts: list[int], pooled: PooledDecode | None) -> torch.Tensor:
        """Layer li's attention for any batch: the pool's decode rows in one call, every other segment on its own.
        qkv [N, (H + 2 KV) * hd] -> [N, H * hd]."""
        q, k, v = self.heads(qkv)
        if pooled is None:
            outs = [self._write_and_attend(q, k, v, li, seg, start, window) for seg, start in zip(segments, starts)]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if not pooled.others:  # every row is one of the pool's decode rows, in order
            return pooled.attend(q, k, v, li, window)
        attn = torch.empty((qkv.shape[0], self.q_rows), dtype=self.dtype, device=self.device)
        attn[pooled.rows] = pooled.attend(q, k, v, li, window)
        for i in pooled.others:
            seg, start = segments[i], starts[i]
            attn[start : start + seg.n] = self._write_and_attend(q, k, v, li, seg, start, window)
        return attn


class PooledDecode:
    """The decode rows (one new position each) of sessions in one KVPool, attended in one call per layer.

    Their slots lie in the range [lo, hi); keys and values are read as views of that range up to the longest
    session (padding masked), queries of slots outside the batch are zero and their outputs dropped. The
    masks are built once per batch, not per layer."""

    MIN_ROWS = 2  # one decode row gains nothing from the padded call

    def __init__(self, stack: DecoderStack, pool: KVPool, segments: list[Segment], rows: list[int],
                 others: list[int]):
        self.stack, self.pool, self.others = stack, pool, others
        device = stack.device
        self.rows = torch.tensor(rows, device=device)
        slots = [seg.session.slot for seg in segments]  # type: ignore[attr-defined]
        self.lo, self.hi = min(slots), max(slots) + 1
        self.slots = torch.tensor(slots, device=device)
        self.local = self.slots - self.lo
        self.pos = torch.tensor([seg.offset for seg in segments], device=device)
        self.ends = self.pos + 1
        self.tmax = max(seg.end for seg in segments)
        self._masks: dict[int | None, torch.Tensor] = {}
        spec = stack.spec  # one query buffer for every layer: the rows of slots outside the batch stay zero
        self.queries = torch.zeros((self.hi - self.lo, spec.num_kv_heads, stack.groups, spec.head_dim),
                                   dtype=stack.dtype, device=device)
        # Masked keys get weight 0, but 0 x NaN is NaN: a slot's never-written memory past a session's end (up to
        # the longest session's) must hold finite values. Once per batch, for every layer at once.
        for seg, slot in zip(segments, slots):
            if seg.end < self.tmax:
                pool.k[:, slot, :, seg.end : self.tmax] = 0
                pool.v[:, slot, :, seg.end : self.tmax] = 0

    @classmethod
    def of(cls, segments: Sequence[Segment], starts: list[int], stack: DecoderStack) -> PooledDecode | None:
        decode = [i for i, seg in enumerate(segments) if seg.n == 1 and isinstance(seg.session, PooledSession)]
        pools = {id(segments[i].session.pool) for i in decode}  # type: ignore[attr-defined]
        if len(decode) < cls.MIN_ROWS or len(pools) != 1:
            return None
        chosen = set(decode)
        others = [i for i in range(len(segments)) if i not in chosen]
        pool = segments[decode[0]].session.pool  # type: ignore[attr-defined]
        return cls(stack, pool, [segments[i] for i in decode], [starts[i] for i in decode], others)

    def mask(self, window: int | None) -> torch.Tensor:
        """[R, 1, 1, tmax] additive mask, 0 where a batch row's query sees a key and -inf elsewhere; rows of
        slots outside the batch see key 0 only (their output is dropped, and a row that sees nothing would be
        NaN)."""
        if window not in self._masks:
            r = self.hi - self.lo
            keys = torch.arange(self.tmax, device=self.stack.device)[None, :]
            seen = keys < self.ends[:, None]
            if window is not None:
                seen &= keys > self.pos[:, None] - window
            mask = torch.zeros((r, self.tmax), dtype=torch.bool, device=self.stack.device)
            mask[:, 0] = True
            mask[self.local] = seen
            additive = torch.zeros(mask.shape, dtype=self.stack.dtype, device=self.stack.device)
            self._masks[window] = additive.masked_fill_(~mask, float("-inf"))[:, None, None, :]
        return self._masks[window]

    def _attention(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   window: int | None) -> torch.Tensor:
        """[R, KV, g, hd] queries over [R, KV, tmax, hd] keys and values.

        On a CPU as two batched matmuls around a softmax: a decode row has a few queries per KV head, too few
        for the fused kernel's blocking (16 rows at 80 keys: 85 against 148 us a layer). A masked key's score
        is -inf; its memory was zeroed, so the score is finite before the mask and its weight exactly 0."""
        if self.stack.device.type != "cpu":
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.mask(window))
        scale = self.stack.spec.head_dim ** -0.5  # scaled_dot_product_attention's default, as the reference uses
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale).add_(self.mask(window))
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, li: int, window: int | None) -> torch.Tensor:
        """Write the rows' keys and values into their slots, attend -> [B, H * hd]."""
        s = self.stack.spec
        b, g, hd = self.rows.shape[0], self.stack.groups, s.head_dim
        if self.others:  # else the batch's rows are these rows, in order: no gather
            q, k, v = q[self.rows], k[self.rows], v[self.rows]
        self.pool.k[li, self.slots, :, self.pos] = k
        self.pool.v[li, self.slots, :, self.pos] = v
        queries = self.queries
        queries[self.local] = q.view(b, s.num_kv_heads, g, hd)
        keys = self.pool.k[li, self.lo : self.hi, :, : self.tmax]  # views: no copy of anyone's cache
        values = self.pool.v[li, self.lo : self.hi, :, : self.tmax]
        out = self._attention(queries, keys, values, window)
        return out[self.local].reshape(b, s.num_heads * hd)
