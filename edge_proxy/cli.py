"""`veil edge`: serve the OpenAI-compatible API with the edge bundle and the policy plane."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import uvicorn

from admin.plane import build_plane
from cloaking.secretbox import key_source
from edge_proxy.app import create_app
from edge_proxy.compute import ComputeThread
from edge_proxy.edge_model import EdgeModel
from veil.identity import fingerprint, load_or_create, public_text
from veil.settings import Settings


def add_parser(sub: Any) -> None:
    edge = sub.add_parser("edge", help="run the edge proxy (OpenAI-compatible API); identity")
    edge.set_defaults(run=run)
    commands = edge.add_subparsers(dest="edge_command")
    commands.add_parser("identity", help="print this edge's public key (made on first use), to enroll it at a core"
                        ).set_defaults(run=run_identity)


def run_identity(settings: Settings, args: argparse.Namespace) -> int:
    key = load_or_create(settings.edge_identity_path()).public_key()
    print(f"public key:  {public_text(key)}\nfingerprint: {fingerprint(key)}\n"
          f"enroll it in the core's allowed-edges file (core.allowed_edges) as\n"
          f"  - name: <a name>\n    public_key: {public_text(key)}\n    max_sessions: 16")
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    if settings.edge.threads > 0:
        torch.set_num_threads(settings.edge.threads)
    plane = build_plane(settings)  # refuses a bad policy store before any weights load
    if plane.bootstrap_secret:
        # Shown once on the console, never logged: the only copy of the first admin key.
        print(f"\n  Bootstrap admin key (shown once; store it, then use it as VEIL_ADMIN_KEY):\n"
              f"  {plane.bootstrap_secret}\n", flush=True)
    compute = ComputeThread()  # loads the model where its tensor work will run: one OpenMP team (see compute.py)
    model = compute.call(EdgeModel.load, settings.edge_bundle_dir(), key_source(settings), settings.edge.quantize)
    uvicorn.run(create_app(settings, model, plane=plane, compute=compute),
                host=settings.edge.host, port=settings.edge.port,
                log_config=None, access_log=False, timeout_graceful_shutdown=5,
                # above the 5 s for which httpx (and so the openai client) reuses an idle connection: at
                # equal timeouts a request sent as the server closes the connection fails
                timeout_keep_alive=75)
    return 0
