"""Decode steps of pooled sessions at fixed shapes, replayed as CUDA graphs on a GPU.

A decode step launches about twenty kernels a block. At batch 1 an 8B-shape block reads its weights in about
0.1 ms on an H200, less than Python and the driver take to launch its kernels one by one, so an eager step
leaves the GPU waiting on the host. A CUDA graph records a step's kernels once and launches them in one call,
but fixes every shape and address it recorded. So the step here is written for fixed shapes:

- a batch bucket B >= the step's rows: the rows past the step's are copies of its first row (same slot, same
  position), which write the same key and value to the same place and whose outputs are dropped;
- a key bucket T >= the longest session: every row attends over its slot's first T positions, a mask hiding
  those past its own. Masked keys weigh 0, but 0 x NaN is NaN, so a slot's positions past its session's are
  zeroed the first time a session reaches this path (a fresh `torch.empty` pool can hold NaN bit patterns);
- a step's rows, slots and positions go to the GPU in one copy, from pinned memory, as one float32 buffer the graph
  reads (slots and positions are exact in float32 below 2**24); the graph casts the rows and writes its output
  as float32, which comes back in one copy before the next graph (all share one memory pool) runs. So a step
  costs the host four calls: the copy in, the replay, the copy out and a wait.

Graphs are captured lazily, one per (B, T) pair met, on the thread that runs the steps. Each layer gathers the
batch's slots (keys and values up to T) into one tensor: at most one layer of the whole pool, 1/layers of its
bytes, which fits in the tenth of the device's memory the KV plan leaves free. Without capture (the tests on a
CPU, the benchmark's reference) the same fixed-shape forward runs eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from veil.model.decoder import DecoderStack
from veil.model.kv import KVPool, PooledSession, Segment

log = logging.getLogger("veil.model.graphs")
KEY_BUCKET = 64  # the shortest key bucket; each next one doubles, up to the pool's token limit
WARMUPS = 2  # eager runs before a capture, on a side stream, as torch's graph docs ask (lazy library set-up)


def buckets(first: int, top: int) -> list[int]:
    """first, 2·first, 4·first, ... below top, then top."""
    out, size = [], first
    while size < top:
        out.append(size)
        size *= 2
    return out + [top]


class _Staging:
    """Batch bucket b's buffers: [b, d + 2] float32 rows, slots and positions on the host (pinned for a GPU) and on
    the device (the same tensor on a CPU), and [b, d] float32 results on the host; with NumPy views of the host's."""

    def __init__(self, b: int, d: int, device: torch.device):
        pin = device.type == "cuda"
        self.host_in = torch.zeros((b, d + 2), dtype=torch.float32, pin_memory=pin)
        self.device_in = torch.zeros((b, d + 2), dtype=torch.float32, device=device) if pin else self.host_in
        self.host_out = torch.zeros((b, d), dtype=torch.float32, pin_memory=pin)
        self.host_in_array, self.host_out_array = self.host_in.numpy(), self.host_out.numpy()


class DecodeGraphs:
    """Runs batches of decode rows (one new position each) of one pool's sessions at fixed shapes."""

    def __init__(self, stack: DecoderStack, pool: KVPool, *, capture: bool):
        assert not capture or stack.device.type == "cuda", "CUDA graphs need a CUDA stack"
        assert pool.limit < 2**24, "positions travel as float32"
        self.stack, self.pool, self.capture = stack, pool, capture
        self.batch_sizes = buckets(1, pool.slots)
        self.key_lengths = buckets(min(KEY_BUCKET, pool.limit), pool.limit)
        self._staged: dict[int, _Staging] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._uncapturable: set[tuple[int, int]] = set()
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self._owners: list[weakref.ref[PooledSession] | None] = [None] * pool.slots
        self.batches = 0  # decode batches run this way

    def takes(self, segments: Sequence[Segment]) -> bool:
        """Every segment is one decode row of a session in this pool."""
        return 0 < len(segments) <= self.pool.slots and all(
            seg.n == 1 and isinstance(seg.session, PooledSession) and seg.session.pool is self.pool
            for seg in segments)

    def step(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x [N, d], one row per segment -> [N, d] float32 on the host after the last block; each session then holds
        its segment."""
        assert self.takes(segments) and x.shape == (len(segments), self.stack.spec.hidden_size)
        assert len({id(seg.session) for seg in segments}) == len(segments), "one segment per session per step"
        with torch.inference_mode():
            out = self._run(x, segments)
        for seg in segments:
            seg.session.commit(seg)
        self.batches += 1
        return out

    def _run(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        n, d = len(segments), self.stack.spec.hidden_size
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        t = self.key_lengths[bisect.bisect_left(self.key_lengths, max(seg.end for seg in segments))]
        sessions: list[PooledSession] = [seg.session for seg in segments]  # type: ignore[misc]
        for seg, session in zip(segments, sessions):
            self._clear_past_end(session, seg.end)
        staging = self._buffers(b)
        # filled through NumPy: a torch op costs the host tens of microseconds on some GPU machines, while the GPU
        # waits for this step's copy
        host = staging.host_in_array
        host[:n, :d] = (x if x.dtype == torch.float32 else x.float()).numpy()
        host[:n, d] = [s.slot for s in sessions]
        host[:n, d + 1] = [seg.offset for seg in segments]
        host[n:] = host[0]  # padding rows repeat the first row, slot and position
        if staging.device_in is not staging.host_in:
            staging.device_in.copy_(staging.host_in, non_blocking=True)
        captured = self._graph(b, t) if self.capture else None
        if captured is not None:
            graph, out = captured
            graph.replay()
        else:
            out = self.forward(staging.device_in, t)
        if out.device.type == "cpu":
            return out[:n]
        staging.host_out.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.stack.device).synchronize()
        return torch.from_numpy(staging.host_out_array[:n].copy())  # the buffer is the next step's

    def _clear_past_end(self, session: PooledSession, end: int) -> None:
        """Zero a slot's positions past `end` the first time its session comes here (see the module's notes)."""
        owner = self._owners[session.slot]
        if owner is not None and owner() is session:
            return
        self.pool.kv[:, :, session.slot, :, end:].zero_()
        self._owners[session.slot] = weakref.ref(session)

    def _buffers(self, b: int) -> _Staging:
        if b not in self._staged:
            self._staged[b] = _Staging(b, self.stack.spec.hidden_size, self.stack.device)
        return self._staged[b]

    def _graph(self, b: int, t: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The graph of bucket (b, t), captured now if it is new; None for a bucket whose capture failed (out of
        memory, say), which runs eagerly from then on: the step's result is the same, only slower, and the failure
        is logged once, not retried at every step."""
        if (b, t) in self._uncapturable:
            return None
        if (b, t) not in self._graphs:
            started = time.perf_counter()
            try:
                self._graphs[b, t] = self._capture(b, t)
            except RuntimeError as exc:  # CUDA errors, out of memory included; the type only (messages name sizes)
                self._uncapturable.add((b, t))
                log.error("decode graph capture failed rows=%d keys=%d error=%s; this bucket runs eagerly", b, t,
                          type(exc).__name__)
                return None
            log.info("decode graph captured rows=%d keys=%d capture_ms=%.0f graphs=%d", b, t,
                     (time.perf_counter() - started) * 1000, len(self._graphs))
        return self._graphs[b, t]

    def _capture(self, b: int, t: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record bucket (b, t)'s step. The warm-up runs compute what the replay will (the same keys and values into
        the same places), so running them is harmless."""
        staged = self._staged[b].device_in
        side = torch.cuda.Stream(self.stack.device)
        side.wait_stream(torch.cuda.current_stream(self.stack.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUPS):
                self.forward(staged, t)
        torch.cuda.current_stream(self.stack.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            out = self.forward(staged, t)
        return graph, out

    def forward(self, staged: torch.Tensor, t: int) -> torch.Tensor:
        """The fixed-shape step: staged [B, d + 2] float32 (rows, then slot and position) -> [B, d] float32; every
        shape depends on (B, t) alone and nothing is read back to the host, so it can be captured."""
        stack, pool, spec = self.stack, self.pool, self.stack.spec
        b, d, kv, g, hd = staged.shape[0], spec.hidden_size, spec.num_kv_heads, stack.groups, spec.head_dim
        x = staged[:, :d].to(stack.dtype)
        slots, pos = staged[:, d].long(), staged[:, d + 1].long()
        cos, sin = stack.rope(pos)
        keys_at = torch.arange(t, device=stack.device)[None, :]
        seen = keys_at <= pos[:, None]  # [B, t]
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(spec.sliding_windows):
            visible = seen if window is None else seen & (keys_at > pos[:, None] - window)
            zeros = torch.zeros(visible.shape, dtype=stack.dtype, device=stack.device)
            masks[window] = zeros.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        for li, layer in enumerate(stack.layers):
            qkv = stack.attention_inputs(layer, x, cos, sin)
            # this step's keys and values, side by side in qkv, into their slots in one copy: [B, 2, KV, hd]
            pool.kv[:, li, slots, :, pos] = qkv[:, stack.q_rows :].view(b, 2, kv, hd)
            both = pool.kv[:, li, :, :, :t].index_select(1, slots)  # [2, B, KV, t, hd]: the batch's slots only
            q = qkv[:, : stack.q_rows].view(b, kv, g, hd)
            attn = F.scaled_dot_product_attention(q, both[0], both[1], attn_mask=masks[layer.window])
            x = stack.block_output(layer, x, attn.reshape(b, spec.num_heads * hd))
        return x.float()
