"""What the console's core page shows: whether the core answers for our bundle, and both sides' facts.

A plain dict that never raises: a core that is down or serves another bundle is reported, not thrown.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from edge_proxy.generate import Engine
from veil.errors import VeilError
from veil.settings import Settings

log = logging.getLogger("veil.edge")


def core_health_probe(settings: Settings, engine: Engine) -> Callable[[], Awaitable[dict[str, Any]]]:
    spec = engine.model.spec

    async def probe() -> dict[str, Any]:
        out: dict[str, Any] = {"core_url": settings.edge.core_url, "model": settings.model.name,
                               "bundle_id": spec.bundle_id, "architecture": spec.architecture,
                               "hidden_size": spec.hidden_size, "edge_layers": spec.edge_layers,
                               "ok": False, "code": None, "error": None}
        try:
            out["context_limit"] = await engine.connect()
            info = await engine.core.info()  # asked every time: connect() remembers an earlier answer
        except VeilError as exc:
            return {**out, "code": exc.code, "error": exc.message}
        except Exception as exc:  # a health page reports whatever went wrong rather than failing itself
            log.warning("core health check failed error=%s", type(exc).__name__)
            return {**out, "code": "internal_error", "error": f"unexpected {type(exc).__name__}"}
        identity = info.get("identity")
        same = info.get("bundle_id") == spec.bundle_id
        return {**out, "ok": same, "code": None if same else "bundle_mismatch",
                "error": None if same else "the core serves another bundle",
                "core_identity": identity.get("fingerprint") if isinstance(identity, dict) else None,
                "core_max_tokens": info.get("max_tokens_per_session")}

    return probe
