"""The test seam: a CoreTransport that runs a core bundle in this process, without HTTP.

It answers as the HTTP transport does: the core's refusals become the edge's CoreErrors
through the same mapping (edge_proxy.core_client.core_refusal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core_server.sessions import SessionTable
from edge_proxy.core_client import check_result, core_refusal
from veil.errors import Conflict, VeilError
from veil.model.decoder import DecoderStack
from veil.wire import StepRequest, StepResult


class InProcessCore:
    def __init__(self, core_dir: Path, max_sessions: int = 8):
        self.stack = DecoderStack.load(core_dir, torch.device("cpu"))
        self.table = SessionTable(self.stack.new_session, max_sessions=max_sessions,
                                  max_tokens=self.stack.spec.max_positions, idle_seconds=60)
        self.received: list[torch.Tensor] = []  # every state the core was sent, for privacy tests

    async def step(self, req: StepRequest) -> StepResult:
        self.received.append(req.hidden.clone())
        try:
            if req.bundle_id != self.stack.spec.bundle_id:
                raise Conflict("another bundle", code="bundle_mismatch")
            if req.offset == 0 and self.table.get(req.session) is None:
                self.table.open(req.session, "in-process", self.table.max_sessions, None)
            seg = self.table.admit(req.session, req.offset, req.hidden.shape[0])
        except VeilError as exc:
            raise core_refusal(exc.status_code, exc.code) from exc
        out = self.stack.step(req.hidden, [seg])
        return check_result(req, StepResult(req.session, seg.session.length, out[[w % seg.n for w in req.want]].clone()))

    async def close_session(self, session: str) -> None:
        self.table.close(session)

    async def info(self) -> dict[str, Any]:
        return {"bundle_id": self.stack.spec.bundle_id, "max_tokens_per_session": self.stack.spec.max_positions,
                "max_result_rows": 64, "verifies_drafts": True}

    async def aclose(self) -> None:
        pass
