"""Both servers run uvicorn on uvloop with httptools' parser: the per-step HTTP cost sits on every decode token.

uvicorn picks them itself ("auto") when they are installed; this fails if the dependencies go missing, where
uvicorn would fall back to asyncio's loop and h11 without a word.
"""

from __future__ import annotations

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


async def _app(scope, receive, send) -> None:  # never called: the config is only resolved
    raise AssertionError


def test_uvicorn_resolves_to_uvloop_and_httptools() -> None:
    config = uvicorn.Config(_app)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    assert config.get_loop_factory() is uvloop.new_event_loop
