"""Logging set-up shared by edge and core: key=value lines with request ids, sizes and timings.

Callers log metadata only; no module passes prompt, reply, token ids or tensors to a logger.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Access logs would duplicate ours; library debug output could echo payloads.
    for noisy in ("uvicorn.access", "httpx", "httpcore", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
