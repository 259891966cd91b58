"""The core page: whether the core answers for this edge's bundle, and what both sides report."""

from __future__ import annotations

from litestar import Request, Response, get

from admin.console.guard import operator, state_of
from admin.console.render import page

FACTS = [("core_url", "Core URL"), ("core_identity", "Core identity"), ("model", "Model"),
         ("bundle_id", "Bundle id"), ("architecture", "Architecture"), ("hidden_size", "Hidden size"),
         ("edge_layers", "Blocks held at the edge"), ("context_limit", "Context limit (tokens)"),
         ("core_max_tokens", "Core's tokens per session")]


@get("/core")
async def core(request: Request) -> Response[str]:
    me = await operator(request)
    health = await state_of(request).core_health()  # never raises: a down core is reported, not thrown
    return page("core.html", me=me, active="core", health=health,
                facts=[(label, health.get(name)) for name, label in FACTS])
