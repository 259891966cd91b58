"""`veil up`: cloak the bundled model on first run, then run core and edge on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from cloaking.cli import cloak_configured
from veil.bundle import CORE_SPEC, EDGE_SPEC, bundle_exists
from veil.settings import Settings
from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, ready_all


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="cloak the model on first run, start core and edge on loopback")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for each server")
    up.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if not (bundle_exists(settings.edge_bundle_dir(), EDGE_SPEC) and bundle_exists(settings.core_bundle_dir(), CORE_SPEC)):
        print("first run: cloaking the model (once) ...", file=sys.stderr)
        cloak_configured(settings, force=True)
    env = dict(os.environ)
    env["VEIL_BUNDLE_KEY_FILE"] = str(settings.key_file_path())
    # both ends on loopback: identities made on first run, this edge enrolled, the core pinned
    wiring = enroll_locally(settings.core_identity_path(), settings.edge_identity_path(),
                            settings.allowed_edges_path(), settings.core.max_sessions)
    if settings.edge.core_public_key:  # the user pinned a key themselves: keep it
        del wiring["VEIL_EDGE_CORE_PUBLIC_KEY"]
    env.update(wiring)
    core_host = "127.0.0.1" if settings.core.host in ("0.0.0.0", "::") else settings.core.host
    env["VEIL_EDGE_CORE_URL"] = f"http://{core_host}:{settings.core.port}"  # the core this command starts
    env.setdefault("HF_HUB_OFFLINE", "1")
    servers: list[Server] = []
    try:
        # launched together so that their start-ups overlap; the edge is ready once its core answers
        servers.append(Server("core", env, settings.core.port, host=settings.core.host, config=args.config,
                              python=settings.core.python))
        servers.append(Server("edge", env, settings.edge.port, host=settings.edge.host, config=args.config))
        ready_all(*servers, timeout=args.timeout)
        edge_url = f"http://{settings.edge.host}:{settings.edge.port}"
        print(f"\nVeil is up. OpenAI base URL: {edge_url}/v1  model: {settings.model.name}\n"
              f"Operator console: {edge_url}/admin/\n(Ctrl-C stops it)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(s.running() for s in servers):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for s in servers:
            s.stop()
