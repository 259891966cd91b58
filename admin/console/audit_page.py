"""The audit log page: the latest lines, and on request a walk of the whole HMAC chain."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Request, Response, get

from admin.console import forms
from admin.console.guard import operator, state_of
from admin.console.render import page

COUNTS = (20, 50, 100, 200, 500)
_CHAIN = {"seq", "prev", "mac", "ts", "event", "actor", "request_id", "salt"}  # shown in columns, or not at all


def _row(line: dict[str, Any]) -> dict[str, Any]:
    details = " ".join(f"{k}={v}" for k, v in sorted(line.items()) if k not in _CHAIN and v is not None)
    return {"seq": line.get("seq"), "ts": line.get("ts"), "event": line.get("event"), "actor": line.get("actor"),
            "details": details}


@get("/audit")
async def audit_log(request: Request) -> Response[str]:
    me = await operator(request)
    log = state_of(request).audit
    n = forms.whole(request.query_params, "n", high=max(COUNTS)) or COUNTS[0]
    if log is None:
        return page("audit.html", me=me, active="audit", enabled=False)
    # tail and verify flush the writer and read the file: off the event loop
    lines = await anyio.to_thread.run_sync(log.tail, n)
    verdict = await anyio.to_thread.run_sync(log.verify) if request.query_params.get("verify") == "1" else None
    return page("audit.html", me=me, active="audit", enabled=True, n=n, counts=sorted({*COUNTS, n}),
                lines=[_row(line) for line in reversed(lines)], verdict=verdict)
