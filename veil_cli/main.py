"""`veil`: one command line for every role. Each role's subcommands live in its own CLI module;
this root only assembles them, so a broken import is an error here, never a missing subcommand."""

from __future__ import annotations

import argparse
import sys

from admin import cli as admin_cli
from cloaking import cli as cloak_cli
from core_server import cli as core_cli
from edge_proxy import cli as edge_cli
from privacy_audit import cli as audit_cli
from veil.errors import VeilError
from veil.logs import configure
from veil.settings import load_settings
from veil_cli import chat, up

ROLES = (up, chat, core_cli, edge_cli, cloak_cli, admin_cli, audit_cli)  # in the order `veil --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Privacy-first OpenAI-compatible LLM gateway.")
    parser.add_argument("--config", help="YAML config file (default: config/veil.yaml or VEIL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ROLES:
        role.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure(settings.log.level)
        return args.run(settings, args)
    except VeilError as exc:
        print(f"veil {args.command}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
