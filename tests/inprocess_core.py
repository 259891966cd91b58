"""The test seam: a CoreTransport that runs a core bundle in this process, without HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core_server.sessions import SessionTable
from veil.model.decoder import DecoderStack, Segment
from veil.wire import StepRequest, StepResult


class InProcessCore:
    def __init__(self, core_dir: Path):
        self.stack = DecoderStack.load(core_dir, torch.device("cpu"))
        s = self.stack.spec
        self.table = SessionTable(layers=s.num_layers, kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                                  dtype=torch.float32, device=torch.device("cpu"), max_sessions=8,
                                  max_tokens=s.max_positions, idle_seconds=60)
        self.received: list[torch.Tensor] = []  # every state the core was sent, for privacy tests

    async def step(self, req: StepRequest) -> StepResult:
        self.received.append(req.hidden.clone())
        n = req.hidden.shape[0]
        sess = self.table.admit(req.session, req.offset, n)
        out = self.stack.forward(req.hidden, [Segment(sess, req.offset, 0, n)])
        sess.length = req.offset + n
        return StepResult(req.session, sess.length, out[[w % n for w in req.want]].clone())

    async def close_session(self, session: str) -> None:
        self.table.close(session)

    async def info(self) -> dict[str, Any]:
        return {"bundle_id": self.stack.spec.bundle_id, "max_tokens_per_session": self.stack.spec.max_positions}

    async def aclose(self) -> None:
        pass
