"""`veil core` (and `veil-core`, the core image's entry point): serve the cloaked decoder blocks;
`veil core keygen` makes the core's identity key."""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from cryptography.hazmat.primitives.asymmetric import x25519
from prometheus_client import start_http_server

from core_server.app import CoreState, create_app, drain
from veil.errors import ConfigError, VeilError
from veil.identity import fingerprint, load_private_key, public_text, write_private_key
from veil.logs import configure
from veil.settings import Settings, load_settings

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h); setting it also turns the adaptive rise off
# A megabyte: what a decode step allocates per op (a few rows of activations, FBGEMM's packing buffers) stays on the
# heap, since mapping and faulting in fresh pages for each of them made a 1-row int8 forward 1.4x slower (16.6 ->
# 23.7 ms) and a float32 one 7% slower at glibc's 128 KiB; KV snapshots, prefill chunks and the pool come from mmap.
_MMAP_THRESHOLD_BYTES = 1 << 20


def _add_commands(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(run=run)
    sub = parser.add_subparsers(dest="core_command")
    keygen = sub.add_parser("keygen", help="make the core's identity key (PEM, 0600) and print its public key")
    keygen.add_argument("--out", help="where to write it (default: core.identity_key_file or <home>/core.key)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key (edges must re-pin)")
    keygen.set_defaults(run=run_keygen)
    show = sub.add_parser("identity", help="print the public key and fingerprint edges pin")
    show.set_defaults(run=run_identity)


def add_parser(sub: Any) -> None:
    _add_commands(sub.add_parser("core", help="run the core server (decoder blocks only); keygen, identity"))


def run_keygen(settings: Settings, args: argparse.Namespace) -> int:
    path = Path(args.out) if args.out else settings.core_identity_path()
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; pass --force to replace it (every edge must then pin the new key)")
    key = x25519.X25519PrivateKey.generate()
    write_private_key(path, key)
    print(f"wrote {path}\npublic key:  {public_text(key.public_key())}\nfingerprint: {fingerprint(key.public_key())}")
    return 0


def run_identity(settings: Settings, args: argparse.Namespace) -> int:
    key = load_private_key(settings.core_identity_path()).public_key()
    print(f"public key:  {public_text(key)}\nfingerprint: {fingerprint(key)}")
    return 0


class _DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C, put the sessions into the locker first, then stop as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state: CoreState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain(self.state)
        super().handle_exit(sig, frame)


def _fixed_mmap_threshold() -> None:
    """Serve every allocation of a megabyte or more (KV snapshots, prefill activations) from mmap, returned to the
    OS when freed. glibc raises its mmap threshold once such a block is freed, after which they come from the
    heap and fragment it: a soak of 64 streams grew the core 40 MiB a minute with a steady session count."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator has no such threshold
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def run(settings: Settings, args: argparse.Namespace) -> int:
    _fixed_mmap_threshold()  # before the bundle is loaded
    app = create_app(settings)
    state: CoreState = app.state  # type: ignore[assignment]
    if settings.core.metrics_port:
        start_http_server(settings.core.metrics_port, settings.core.metrics_host, registry=state.metrics.registry)
    config = uvicorn.Config(app, host=settings.core.host, port=settings.core.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5)
    _DrainingServer(config, state).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The core image has no composition root (it ships veil/ and core_server/ only): this is its command."""
    parser = argparse.ArgumentParser(prog="veil-core", description="Veil core server: cloaked decoder blocks.")
    parser.add_argument("--config", help="YAML config file (default: config/veil.yaml or VEIL_CONFIG)")
    _add_commands(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure(settings.log.level)
        return args.run(settings, args)
    except VeilError as exc:
        print(f"veil-core: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
