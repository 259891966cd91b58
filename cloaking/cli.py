"""`veil cloak`: fold a fresh rotation into a checkpoint and write the edge and core bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cloaking.checkpoint import bundled_model_path, load_checkpoint
from cloaking.cloak import cloak
from cloaking.secretbox import key_source
from veil.settings import Settings


def add_parser(sub: Any) -> None:
    cl = sub.add_parser("cloak", help="fold a fresh rotation into a checkpoint; write edge and core bundles")
    cl.add_argument("checkpoint", nargs="?", help="HF folder or .gguf file (default: the bundled SmolLM2)")
    cl.add_argument("--edge-out", help="edge bundle directory")
    cl.add_argument("--core-out", help="core bundle directory")
    cl.add_argument("--force", action="store_true", help="replace existing bundles")
    cl.add_argument("--edge-layers", type=int, default=0, metavar="K",
                    help="the edge runs the first K decoder blocks itself; the core bundle holds the rest")
    cl.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
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
