"""What runs the forward pass behind the core's step API, and Veil's own engine.

The core server owns sealing, sessions, limits, the locker, metrics and health; an engine only
turns a batch of steps (each a session's new rotated rows at an offset) into the rotated
residual states the steps ask for. Two engines exist: `native` (Veil's batched loop over the
folded blocks, below: the embedded default and the exactness reference) and `vllm`
(core_server.vllm_engine: vLLM in this process, fed prompt embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import torch

from veil.bundle import CoreSpec
from veil.model.decode_graphs import DecodeGraphs
from veil.model.decoder import DecoderStack
from veil.model.kv import Positions, Segment, Session


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStep:
    """One admitted step: its new rows [n, d], where they go, and which of them to send back."""

    hidden: torch.Tensor
    segment: Segment
    want: Sequence[int]  # indices into the new rows; negative ones count from the end


class CoreEngine(Protocol):
    name: str
    spec: CoreSpec
    device: torch.device
    dtype: torch.dtype
    rows_computed: int  # rows run through the blocks so far (a prefix cache spares the rest)
    verifies_drafts: bool  # a step that wants every new row costs about what its last row alone does

    def new_session(self, limit: int) -> Positions:
        """An empty state for a session of at most `limit` positions."""
        ...

    def run(self, steps: Sequence[EngineStep]) -> list[torch.Tensor]:
        """Run the steps as one batch -> per step, its wanted rows [len(want), d] as float32 on the CPU;
        each session then holds its segment. A failure raises and commits nothing."""
        ...


def kv_bytes_per_token(spec: CoreSpec, dtype: torch.dtype) -> int:
    """KV cache bytes one position of one session takes over all layers."""
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()


class NativeEngine:
    """Veil's own stack over a KV pool made at start: projections and MLPs over the whole batch, the decode
    rows' attention in one call per layer, a prefill's attention per session. With `cuda_graphs`, a batch of
    decode rows only runs as a CUDA graph replay (veil.model.decode_graphs)."""

    name = "native"
    verifies_drafts = True  # every row's state is computed anyway: an edge may send draft tokens to verify

    def __init__(self, stack: DecoderStack, sessions: int, limit: int, *, cuda_graphs: bool = False):
        self.stack, self.spec, self.device, self.dtype = stack, stack.spec, stack.device, stack.dtype
        self.pool = stack.new_pool(sessions, limit)
        self.graphs = DecodeGraphs(stack, self.pool, capture=True) if cuda_graphs else None
        self.rows_computed = 0

    @property
    def pool_bytes(self) -> int:
        return self.pool.k.nbytes + self.pool.v.nbytes

    def new_session(self, limit: int) -> Session:
        assert limit == self.pool.limit, "the pool's slots hold the core's token limit"
        return self.pool.session()

    def run(self, steps: Sequence[EngineStep]) -> list[torch.Tensor]:
        x = steps[0].hidden if len(steps) == 1 else torch.cat([s.hidden for s in steps])
        segments = [s.segment for s in steps]
        if self.graphs is not None and self.graphs.takes(segments):
            out = self.graphs.step(x, segments)
        else:
            out = self.stack.step(x, segments)
        self.rows_computed += x.shape[0]
        # one gather and one device-to-host copy for the whole batch
        rows: list[int] = []
        counts: list[int] = []
        start = 0
        for s in steps:
            rows.extend(start + (w % s.segment.n) for w in s.want)
            counts.append(len(s.want))
            start += s.segment.n
        if rows != list(range(out.shape[0])):  # else every row is wanted, in order (a batch of decode rows)
            out = out.index_select(0, torch.tensor(rows, device=out.device))
        if out.device.type != "cpu" or out.dtype != torch.float32:
            out = out.to("cpu", torch.float32)
        return list(out.split(counts))
