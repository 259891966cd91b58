"""`veil core` (and `veil-core`, the core image's entry point): serve the cloaked decoder blocks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import uvicorn

from core_server.app import create_app
from veil.errors import VeilError
from veil.logs import configure
from veil.settings import Settings, load_settings


def add_parser(sub: Any) -> None:
    sub.add_parser("core", help="run the core server (decoder blocks only)").set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    uvicorn.run(create_app(settings), host=settings.core.host, port=settings.core.port,
                log_config=None, access_log=False, timeout_graceful_shutdown=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The core image has no composition root (it ships veil/ and core_server/ only): this is its command."""
    parser = argparse.ArgumentParser(prog="veil-core", description="Veil core server: cloaked decoder blocks.")
    parser.add_argument("--config", help="YAML config file (default: config/veil.yaml or VEIL_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure(settings.log.level)
        return run(settings, args)
    except VeilError as exc:
        print(f"veil-core: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
