"""`veil`: one command line for every role (up, edge, core, cloak)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from veil.errors import VeilError
from veil.logs import configure
from veil.settings import Settings, load_settings

log = logging.getLogger("veil.cli")


def key_source(settings: Settings, create: bool = False):
    """The bundle key: VEIL_BUNDLE_PASSPHRASE if set, else the key file (created on first use if asked)."""
    from cloaking.secretbox import KeySource, create_key_file

    if settings.bundle.passphrase:
        return KeySource(passphrase=settings.bundle.passphrase)
    path = settings.key_file_path()
    if not path.exists():
        if not create:
            raise VeilError(f"no bundle key: set VEIL_BUNDLE_PASSPHRASE or create the key file {path}",
                            code="config_error")
        create_key_file(path)
        log.info("created bundle key file %s (mode 0600); keep it with the edge bundle", path)
    return KeySource(key_file=path)


def cmd_cloak(settings: Settings, args: argparse.Namespace) -> int:
    from cloaking.checkpoint import bundled_model_path, load_checkpoint
    from cloaking.cloak import cloak

    checkpoint = Path(args.checkpoint or settings.model.checkpoint or bundled_model_path())
    edge_dir = Path(args.edge_out) if args.edge_out else settings.edge_bundle_dir()
    core_dir = Path(args.core_out) if args.core_out else settings.core_bundle_dir()
    source = key_source(settings, create=True)
    print(f"loading {checkpoint} ...", file=sys.stderr)
    ckpt = load_checkpoint(checkpoint)
    bundle_id = cloak(ckpt, edge_dir, core_dir, source, settings.model.name, force=args.force,
                      edge_layers=args.edge_layers)
    print(f"edge bundle: {edge_dir}\ncore bundle: {core_dir}\nbundle id:   {bundle_id}")
    return 0


def cmd_core(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from core_server.app import create_app

    uvicorn.run(create_app(settings), host=settings.core.host, port=settings.core.port,
                log_config=None, access_log=False, timeout_graceful_shutdown=5)
    return 0


def cmd_edge(settings: Settings, args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from admin.plane import build_plane
    from edge_proxy.app import create_app
    from edge_proxy.edge_model import EdgeModel

    if settings.edge.threads > 0:
        torch.set_num_threads(settings.edge.threads)
    plane = build_plane(settings)  # refuses a bad policy store before any weights load
    if plane.bootstrap_secret:
        # Shown once on the console, never logged: the only copy of the first admin key.
        print(f"\n  Bootstrap admin key (shown once; store it, then use it as VEIL_ADMIN_KEY):\n"
              f"  {plane.bootstrap_secret}\n", flush=True)
    model = EdgeModel.load(settings.edge_bundle_dir(), key_source(settings))
    uvicorn.run(create_app(settings, model, plane=plane), host=settings.edge.host, port=settings.edge.port,
                log_config=None, access_log=False, timeout_graceful_shutdown=5)
    return 0


def cmd_admin(settings: Settings, args: argparse.Namespace) -> int:
    from admin.cli import run

    return run(settings, args)


def cmd_audit_privacy(settings: Settings, args: argparse.Namespace) -> int:
    from privacy_audit.cli import run

    return run(settings, args)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VeilError(f"a server exited during start-up (exit code {proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise VeilError(f"{url} was not ready after {timeout:.0f}s")


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from veil.bundle import CORE_SPEC, EDGE_SPEC, bundle_exists

    if not (bundle_exists(settings.edge_bundle_dir(), EDGE_SPEC) and bundle_exists(settings.core_bundle_dir(), CORE_SPEC)):
        print("first run: cloaking the model (once) ...", file=sys.stderr)
        cmd_cloak(settings, argparse.Namespace(checkpoint=None, edge_out=None, core_out=None, force=True,
                                               edge_layers=0))
    env = dict(os.environ)
    env["VEIL_BUNDLE_KEY_FILE"] = str(settings.key_file_path())
    env.setdefault("HF_HUB_OFFLINE", "1")
    base = [sys.executable, "-m", "veil_cli"] + (["--config", args.config] if args.config else [])
    procs = [subprocess.Popen(base + ["core"], env=env)]
    try:
        _wait_ready(f"http://{settings.core.host}:{settings.core.port}/readyz", procs[0], args.timeout)
        procs.append(subprocess.Popen(base + ["edge"], env=env))
        _wait_ready(f"http://{settings.edge.host}:{settings.edge.port}/readyz", procs[1], args.timeout)
        print(f"\nVeil is up. OpenAI base URL: http://{settings.edge.host}:{settings.edge.port}/v1  "
              f"model: {settings.model.name}\n(Ctrl-C stops it)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Privacy-first OpenAI-compatible LLM gateway.")
    parser.add_argument("--config", help="YAML config file (default: config/veil.yaml or VEIL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="cloak the model on first run, start core and edge on loopback")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for each server")
    sub.add_parser("core", help="run the core server (decoder blocks only)")
    sub.add_parser("edge", help="run the edge proxy (OpenAI-compatible API)")
    cl = sub.add_parser("cloak", help="fold a fresh rotation into a checkpoint; write edge and core bundles")
    cl.add_argument("checkpoint", nargs="?", help="HF folder or .gguf file (default: the bundled SmolLM2)")
    cl.add_argument("--edge-out", help="edge bundle directory")
    cl.add_argument("--core-out", help="core bundle directory")
    cl.add_argument("--force", action="store_true", help="replace existing bundles")
    cl.add_argument("--edge-layers", type=int, default=0, metavar="K",
                    help="the edge runs the first K decoder blocks itself; the core bundle holds the rest")
    for module in ("admin.cli", "privacy_audit.cli"):
        try:
            add_parser = importlib.import_module(module).add_parser
        except ImportError:  # the core image ships without the admin plane and the audit
            continue
        add_parser(sub)
    return parser


COMMANDS = {"up": cmd_up, "core": cmd_core, "edge": cmd_edge, "cloak": cmd_cloak, "admin": cmd_admin,
            "audit-privacy": cmd_audit_privacy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure(settings.log.level)
        return COMMANDS[args.command](settings, args)
    except VeilError as exc:
        print(f"veil {args.command}: {exc.message}", file=sys.stderr)
        return 2
