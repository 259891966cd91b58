"""`veil`: one command line for every role. Each role's subcommands live in its own CLI module;
this root only assembles them, so a broken import is an error here, never a missing subcommand.

Only the named role's module is imported: `veil admin` and `veil chat` talk HTTP and need neither
torch nor the edge's model code, which would cost seconds per call. `veil --help`, or a command
that names no role, imports them all."""

from __future__ import annotations

import argparse
import importlib
import sys

from veil.errors import VeilError
from veil.logs import configure
from veil.settings import load_settings

# command -> the module whose add_parser registers it, in the order `veil --help` lists them
ROLES = {
    "up": "veil_cli.up",
    "chat": "veil_cli.chat",
    "core": "core_server.cli",
    "edge": "edge_proxy.cli",
    "cloak": "cloaking.cli",
    "admin": "admin.cli",
    "audit-privacy": "privacy_audit.cli",
}


def named_role(argv: list[str]) -> str | None:
    """The role the command line names after the root's own options, or None (help, or no role)."""
    rest = iter(argv)
    for arg in rest:
        if arg == "--config":
            next(rest, None)
        elif not arg.startswith("--config="):
            return arg if arg in ROLES else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`'s role alone when it names one, else for every role."""
    role = named_role(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="veil", description="Privacy-first OpenAI-compatible LLM gateway.")
    parser.add_argument("--config", help="YAML config file (default: config/veil.yaml or VEIL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in [ROLES[role]] if role else ROLES.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure(settings.log.level)
        return args.run(settings, args)
    except VeilError as exc:
        print(f"veil {args.command}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
