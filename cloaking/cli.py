"""`veil cloak`: fold a fresh rotation into a checkpoint and write the edge and core bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cloaking.checkpoint import bundled_model_path, load_checkpoint
from cloaking.cloak import cloak
from cloaking.secretbox import key_source
from veil.model.hf_export import BUNDLE_SUBDIR, export_hf
from veil.settings import Settings


def add_parser(sub: Any) -> None:
    cl = sub.add_parser("cloak", help="fold a fresh rotation into a checkpoint; write edge and core bundles")
    cl.add_argument("checkpoint", nargs="?", help="HF folder or .gguf file (default: the bundled SmolLM2)")
    cl.add_argument("--edge-out", help="edge bundle directory")
    cl.add_argument("--core-out", help="core bundle directory")
    cl.add_argument("--force", action="store_true", help="replace existing bundles")
    cl.add_argument("--edge-layers", type=int, default=0, metavar="K",
                    help="the edge runs the first K decoder blocks itself; the core bundle holds the rest")
    cl.add_argument("--core-format", choices=("native", "hf"), default="native",
                    help="hf: also write the core bundle as a Hugging Face folder (<core>/hf) for the vllm engine, "
                         "so that the core does not convert it at start")
    cl.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    cloak_configured(settings, args.checkpoint, args.edge_out, args.core_out, force=args.force,
                     edge_layers=args.edge_layers, core_format=args.core_format)
    return 0


def cloak_configured(settings: Settings, checkpoint: str | None = None, edge_out: str | None = None,
                     core_out: str | None = None, *, force: bool = False, edge_layers: int = 0,
                     core_format: str = "native") -> None:
    """Cloak the given checkpoint (default: the configured one, else the bundled model) into the
    given or configured bundle folders."""
    source_path = Path(checkpoint or settings.model.checkpoint or bundled_model_path())
    edge_dir = Path(edge_out) if edge_out else settings.edge_bundle_dir()
    core_dir = Path(core_out) if core_out else settings.core_bundle_dir()
    source = key_source(settings, create=True)
    print(f"loading {source_path} ...", file=sys.stderr)
    ckpt = load_checkpoint(source_path)
    bundle_id = cloak(ckpt, edge_dir, core_dir, source, settings.model.name, force=force, edge_layers=edge_layers)
    print(f"edge bundle: {edge_dir}\ncore bundle: {core_dir}\nbundle id:   {bundle_id}")
    if core_format == "hf":
        hf = export_hf(core_dir, core_dir / BUNDLE_SUBDIR)
        print(f"core as HF:  {hf} (the vllm engine loads it as it is)")
