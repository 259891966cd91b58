"""Where a vllm-engine decode step spends its time at 64, 1k and 4k rows of context.

Runs vLLM as the core's vllm engine does (pooling runner, prompt embeddings, prefix caching,
a session's whole sequence per step) on a core bundle, and times a one-row decode step split
into `add_request` (vLLM hashes every block's embeddings of the new request) and the engine
step (the forward of the rows after the last cached block), with the engine core in this
process (what Veil runs) and in its own process (vLLM's default, which pickles the prefix to
it at every step). Run it with the vllm engine's interpreter:

    .venv-core-vllm/bin/python bench/vllm_step_cost.py --core-bundle ~/.local/share/veil/bundles/smollm2-135m-instruct/core
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONTEXTS = (64, 1024, 4096)
STEPS = 30


def measure(hf_dir: str, dim: int) -> None:
    """In a process whose VLLM_ENABLE_V1_MULTIPROCESSING is already set: print one line per context."""
    import torch
    from vllm import EngineArgs
    from vllm.pooling_params import PoolingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=hf_dir, runner="pooling", enable_prompt_embeds=True, enable_prefix_caching=True, dtype="float32",
        enforce_eager=True, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 30, max_model_len=8192,
        block_size=32, disable_log_stats=True))

    def run(rid: str, rows: torch.Tensor) -> tuple[float, float]:
        start = time.perf_counter()
        engine.add_request(rid, {"prompt_embeds": rows, "cache_salt": "bench"}, PoolingParams(task="embed"))
        added = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return added - start, time.perf_counter() - added

    gen = torch.Generator().manual_seed(0)
    for context in CONTEXTS:
        rows = torch.randn(context + STEPS, dim, generator=gen) * 0.05
        run(f"prefill-{context}", rows[:context])
        times = [run(f"decode-{context}-{i}", rows[: context + i + 1]) for i in range(STEPS)]
        add = statistics.median(t[0] for t in times) * 1000
        step = statistics.median(t[1] for t in times) * 1000
        print(f"RESULT {context} {add:.2f} {step:.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core-bundle", required=True, help="a core bundle from `veil cloak`")
    parser.add_argument("--child", nargs=2, metavar=("HF_DIR", "DIM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], int(args.child[1]))
        return 0
    from veil.bundle import read_core_spec
    from veil.model.hf_export import export_hf

    dim = read_core_spec(Path(args.core_bundle)).hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(Path(args.core_bundle), Path(tmp) / "hf")
        results: dict[str, dict[int, tuple[float, float]]] = {}
        for mode, flag in (("in-process", "0"), ("own process", "1")):
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": flag}
            out = subprocess.run([sys.executable, __file__, "--core-bundle", args.core_bundle, "--child", str(hf),
                                  str(dim)], env=env, capture_output=True, text=True, check=True).stdout
            results[mode] = {int(c): (float(a), float(s)) for _, c, a, s in
                             (line.split() for line in out.splitlines() if line.startswith("RESULT "))}
    print(f"{'engine core':<14}{'context':>8}{'add_request ms':>16}{'step ms':>10}{'total ms':>10}")
    for mode, rows in results.items():
        for context, (add, step) in rows.items():
            print(f"{mode:<14}{context:>8}{add:>16.1f}{step:>10.1f}{add + step:>10.1f}")
    for context in CONTEXTS:
        inproc, own = (sum(results[m][context]) for m in ("in-process", "own process"))
        print(f"context {context}: in-process / own process = {inproc / own:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
