"""The core's two engines side by side: native vs vllm, same cloaked model, same machine, one run.

For each engine a real core and edge run on loopback ports and are measured the same way:
- decode tok/s of one stream, and aggregate tok/s at 1, 4 and 16 concurrent streams, streamed
  through the edge with the openai wire format;
- prefill tok/s of a 1,000-row prompt, at the core's sealed step API;
- the per-step cost of a decode step at 64, 1k and 4k rows of context (is it O(new rows)?).
Prints every figure and the vllm ÷ native ratio.

    python bench/engines.py --core-python .venv-core-vllm/bin/python [--tokens 48] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.split_vs_generate import MODEL_NAME, bench_split, bench_split_concurrent  # noqa: E402
from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak, eos_ids  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil.bundle import read_core_spec  # noqa: E402
from veil.wire import StepRequest  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

CONTEXTS = (64, 1024, 4096)
PREFILL_ROWS = 1000


async def core_costs(pair: VeilPair, dim: int, bundle_id: str) -> dict[str, float]:
    """Prefill tok/s of PREFILL_ROWS rows, and the median ms of a one-row decode step after each context."""
    transport = pair.core_transport()
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    try:
        for i, context in enumerate((PREFILL_ROWS,) + CONTEXTS):
            sid = f"{i:032x}"
            rows = torch.randn(context, dim, generator=gen) * 0.05
            start = time.perf_counter()
            await transport.step(StepRequest(sid, 0, rows, [-1], bundle_id=bundle_id))
            prefill = time.perf_counter() - start
            if i == 0:
                out["prefill_tok_s"] = context / prefill
                await transport.close_session(sid)
                continue
            costs = []
            for t in range(24):
                row = torch.randn(1, dim, generator=gen) * 0.05
                start = time.perf_counter()
                await transport.step(StepRequest(sid, context + t, row, [-1], bundle_id=bundle_id))
                costs.append(time.perf_counter() - start)
            out[f"step_ms_{context}"] = statistics.median(costs[4:]) * 1000
            await transport.close_session(sid)
    finally:
        await transport.aclose()
    return out


def measure(engine: str, root: Path, key: Path, core_python: str, tokens: int, eos: list[int]) -> dict[str, float]:
    env = {"VEIL_CORE_MAX_TOKENS_PER_SESSION": str(max(CONTEXTS) + 128), "VEIL_CORE_MAX_SESSIONS": "32",
           "VEIL_LOG_LEVEL": "warning"}
    if engine == "vllm":
        env.update(VEIL_CORE_ENGINE="vllm", VEIL_CORE_PYTHON=core_python, VEIL_CORE_KV_BUDGET_BYTES=str(1 << 30))
    home = root / f"run-{engine}"
    home.mkdir()
    pair = VeilPair(home, root / "edge", root / "core", key, MODEL_NAME, core_env=env)
    try:
        bench_split(pair.base_url, eos, 8)  # warm-up
        figures = {"decode_tok_s": statistics.median(bench_split(pair.base_url, eos, tokens)[1] for _ in range(3))}
        for streams in (1, 4, 16):
            figures[f"aggregate_tok_s_{streams}"] = bench_split_concurrent(pair.base_url, eos, tokens, streams)
        spec = read_core_spec(root / "core")
        figures.update(asyncio.run(core_costs(pair, spec.hidden_size, spec.bundle_id)))
        return figures
    finally:
        pair.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core-python", required=True, help="the vllm engine's interpreter (make core-vllm)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--checkpoint", help="HF folder or GGUF (default: the bundled SmolLM2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = root / "bundle.key"
        create_key_file(key)
        ckpt = load_checkpoint(Path(args.checkpoint or bundled_model_path()))
        cloak(ckpt, root / "edge", root / "core", KeySource(key_file=key), MODEL_NAME, progress=False)
        eos = eos_ids(ckpt)
        del ckpt
        results = {engine: measure(engine, root, key, args.core_python, args.tokens, eos)
                   for engine in ("native", "vllm")}
    print(f"\n{'figure':<24}{'native':>12}{'vllm':>12}{'vllm/native':>14}")
    for name in results["native"]:
        a, b = results["native"][name], results["vllm"][name]
        print(f"{name:<24}{a:>12.1f}{b:>12.1f}{b / a:>14.2f}")
    for engine, r in results.items():
        print(f"{engine}: decode step at 1k context / at 64 = {r['step_ms_1024'] / r['step_ms_64']:.2f}, "
              f"at 4k / at 64 = {r['step_ms_4096'] / r['step_ms_64']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
