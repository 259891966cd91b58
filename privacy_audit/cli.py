"""`veil audit-privacy`: play the core operator against each defense setting and publish the frontier."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from privacy_audit.runner import FULL, FULL_PROMPTS, QUICK, QUICK_PROMPTS, QUICK_WIRE_CURVE, WIRE_CURVE, AuditConfig, Setting
from veil.settings import Settings

DEFAULT_BUDGET = 30.0
QUICK_BUDGET = 10.0


def parse_setting(text: str) -> Setting:
    """'none', 'rho=0.5', 'k=2', 'k=2+rho=0.1', 'rho=1+clip' -> Setting."""
    rho, k, clip = 0.0, 0, False
    if text.strip() != "none":
        for part in text.split("+"):
            key, _, value = part.strip().partition("=")
            if key == "rho":
                rho = float(value)
            elif key == "k":
                k = int(value)
            elif key == "clip" and not value:
                clip = True
            else:
                raise argparse.ArgumentTypeError(f"unknown setting part {part!r}: use none, rho=X, k=N, clip")
    return Setting(rho, k, clip)


def _settings_list(text: str) -> list[Setting]:
    return [parse_setting(t) for t in text.split(",") if t.strip()]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit-privacy",
                       help="attack the defenses as the core operator and a wire observer would; write table and plot")
    p.set_defaults(run=run)
    p.add_argument("--out", required=True, help="folder for results.md, results.json and frontier.png")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_PROMPTS} prompts, settings none, rho 0.1, 1 and 3, k=2: about two minutes, for CI")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"use the first N of the 240 shipped prompts (default {FULL_PROMPTS}; 0 = all)")
    p.add_argument("--settings", type=_settings_list, default=None, metavar="LIST",
                   help="comma list replacing the grid, e.g. none,rho=0.5,k=2,k=2+rho=0.1,rho=1+clip")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"operator text generation for attack D's inverter (default {DEFAULT_BUDGET:g}, "
                        f"--quick {QUICK_BUDGET:g})")
    p.add_argument("--seed", type=int, default=0, help="noise draws, sampling and bootstrap (default 0)")
    p.add_argument("--insecure-transport", action="store_true",
                   help="for comparison only: also attack the unsealed step frames (the wire before sealing) "
                        "with the strongest wire observer (norm match, and the chat template's known plaintext "
                        "across requests); the sealed wire is always measured")
    p.add_argument("--checkpoint", default=None,
                   help="public base checkpoint (default: model.checkpoint from the config, else the bundled model)")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    quick = bool(args.quick)
    return AuditConfig(
        out=Path(args.out),
        settings=list(args.settings or (QUICK if quick else FULL)),
        prompts=(args.prompts or None) if args.prompts is not None else (QUICK_PROMPTS if quick else FULL_PROMPTS),
        budget=args.budget if args.budget is not None else (QUICK_BUDGET if quick else DEFAULT_BUDGET),
        seed=args.seed,
        insecure_transport=bool(getattr(args, "insecure_transport", False)),
        wire_curve=QUICK_WIRE_CURVE if quick else WIRE_CURVE,
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cloaking.checkpoint import bundled_model_path, load_checkpoint
    from privacy_audit import report
    from privacy_audit.prompts import load_prompts
    from privacy_audit.runner import run_audit, sizes
    from privacy_audit.span_audit import SpanConfig, run_span_audit
    from privacy_audit.span_audit import sizes as span_sizes
    from privacy_audit.span_canaries import load_span_prompts

    config = config_from_args(args)
    span_kw: dict[str, Any] = dict(seed=config.seed, span_rho=settings.privacy.span_noise_rho,
                                   ner_model=settings.privacy.ner_model)
    span_config = SpanConfig.quick(**span_kw) if args.quick else SpanConfig(**span_kw)
    started = time.perf_counter()
    source = args.checkpoint or settings.model.checkpoint or bundled_model_path()
    ckpt = load_checkpoint(source)
    total = sizes(config, len(load_prompts())) + span_sizes(span_config, len(load_span_prompts()))
    bar = tqdm(total=total, unit="step", desc="audit-privacy", file=sys.stderr)

    def progress(stage: str, n: int) -> None:
        bar.set_description(stage, refresh=False)
        bar.update(n)

    try:
        doc = run_audit(ckpt, config, progress)
        doc["span_protection"] = run_span_audit(ckpt, span_config, progress)
    finally:
        bar.close()
    paths = report.write(doc, config.out)
    print(report.markdown(doc))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0
