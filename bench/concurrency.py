"""Aggregate decode throughput at 1, 4 and 16 concurrent streams through edge and core, and what the core's
gathering wait (`core.batch_wait_ms`) does to it: one run, the same cloaked model and machine, the core
started once with the wait off and once with the wait given.

For each setting it prints aggregate tok/s per stream count, the ratio 16 streams ÷ 1 stream (issue 15's goal
is >= 8), and the mean rows per batched forward (the core's `veil_core_batch_tokens` histogram, prefill rows
included): the closer to the stream count, the fewer forwards the streams' steps were split over.

First it times the core's decode forward alone, in this process, at 1, 4 and 16 rows: the most any number of
streams can gain is what a forward of 16 rows costs against one of 1, before the edge's share of the same
CPU is counted.

With `--device cuda` the core runs on the GPU (`core.device`; use `--dtype bfloat16`), with its CUDA graphs,
and the edge on the host's CPUs. `--checkpoint` takes another model than the bundled one (a Hugging Face
directory or a GGUF file; a machine without the bundled package can take a directory of random weights).

`--core-layers N` cloaks the model cut to its first N decoder layers (the replies are gibberish, the shapes
and every per-token cost outside the core's forward are the real ones). With N = 1 the core's forward costs
next to nothing, as a GPU's would beside this model, and 16 ÷ 1 becomes what the edge, the transport and the
clients allow on this machine's CPUs.

    python bench/concurrency.py [--tokens 48] [--wait-ms 10] [--threads 0] [--quantize int8] [--dtype bfloat16]
                               [--edge-quantize int8] [--edge-threads 1] [--max-batch-tokens 8] [--batch-groups 2]
                               [--device cuda] [--checkpoint DIR] [--core-layers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.split_vs_generate import MODEL_NAME, _histogram_mean, bench_split, bench_split_concurrent  # noqa: E402
from cloaking.checkpoint import Checkpoint, bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak, eos_ids  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil.model.decoder import DecoderStack  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

STREAMS = (1, 4, 16)


def core_forward_ms(core_dir: Path, threads: int, quantize: str = "none", dtype: str = "float32",
                    context: int = 40, repeats: int = 30, device: str = "cpu") -> dict[int, float]:
    """Median ms of one decode forward of the core's stack alone, per batch size (rows at `context`); on a GPU
    eager (the core replays CUDA graphs), timed to the device's completion."""
    if threads:
        torch.set_num_threads(threads)
    where = torch.device(device)
    stack = DecoderStack.load(core_dir, where, getattr(torch, dtype), quantize=quantize)
    s = stack.spec
    gen = torch.Generator().manual_seed(0)
    out = {}
    for rows in STREAMS:
        pool = stack.new_pool(rows, context + repeats)
        sessions = [pool.session() for _ in range(rows)]
        stack.step(torch.randn(context * rows, s.hidden_size, generator=gen) * 0.05,
                   [x.begin(0, context) for x in sessions])
        times = []
        for t in range(repeats):
            segments = [x.begin(context + t, 1) for x in sessions]
            x = (torch.randn(rows, s.hidden_size, generator=gen) * 0.05).to(where)
            _synchronize(where)
            started = time.perf_counter()
            stack.step(x, segments)
            _synchronize(where)
            times.append(time.perf_counter() - started)
        out[rows] = statistics.median(times) * 1000
        del sessions, pool
    return out


def keep_first_layers(ckpt: Checkpoint, n: int) -> None:
    """Cut the checkpoint's model to its first `n` decoder layers, in place."""
    model = ckpt.model
    if not 1 <= n <= model.config.num_hidden_layers:
        raise SystemExit(f"--core-layers must be between 1 and {model.config.num_hidden_layers}")
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_rows(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the core's rows-per-forward histogram."""
    return _histogram_mean(httpx.get(metrics_url + "/metrics").text, "veil_core_batch_tokens")


def measure(root: Path, key: Path, eos: list[int], args: argparse.Namespace, wait_ms: float) -> dict[str, float]:
    """Both servers started with the command line's settings and `core.batch_wait_ms` = `wait_ms`: the figures
    for 1, 4 and 16 streams."""
    env = {"VEIL_CORE_MAX_SESSIONS": "32", "VEIL_LOG_LEVEL": "warning", "VEIL_CORE_BATCH_WAIT_MS": str(wait_ms),
           "VEIL_CORE_THREADS": str(args.threads), "VEIL_CORE_QUANTIZE": args.quantize,
           "VEIL_CORE_DTYPE": args.dtype, "VEIL_CORE_BATCH_GROUPS": str(args.batch_groups),
           "VEIL_CORE_DEVICE": args.device}
    if args.max_batch_tokens:
        env["VEIL_CORE_MAX_BATCH_TOKENS"] = str(args.max_batch_tokens)
    home = root / f"wait-{wait_ms:g}"
    home.mkdir()
    pair = VeilPair(home, root / "edge", root / "core", key, MODEL_NAME, core_env=env,
                    edge_env={"VEIL_EDGE_QUANTIZE": args.edge_quantize, "VEIL_EDGE_THREADS": str(args.edge_threads)})
    try:
        bench_split(pair.base_url, eos, 8)  # warm-up
        if args.device == "cuda":  # capture each batch's CUDA graphs before the timed runs
            for streams in STREAMS:
                bench_split_concurrent(pair.base_url, eos, args.tokens, streams)
        out: dict[str, float] = {}
        for streams in STREAMS:
            before = _batch_rows(pair.metrics_url)
            out[f"aggregate_tok_s_{streams}"] = bench_split_concurrent(pair.base_url, eos, args.tokens, streams)
            after = _batch_rows(pair.metrics_url)
            out[f"rows_per_forward_{streams}"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
        return out
    finally:
        pair.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="core.batch_wait_ms to compare with 0")
    parser.add_argument("--threads", type=int, default=0, help="core.threads (0 = torch's default)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="the core's core.quantize")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the core's core.dtype")
    parser.add_argument("--edge-threads", type=int, default=0, help="edge.threads (0 = torch's default)")
    parser.add_argument("--edge-quantize", default="none", choices=("none", "int8"), help="the edge's edge.quantize")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="core.max_batch_tokens (0 = the core's default); half the streams makes two groups whose "
                             "forwards alternate with the edge's work on them")
    parser.add_argument("--batch-groups", type=int, default=1,
                        help="core.batch_groups: a forward takes at most 1/N of the live sessions (the same "
                             "alternation as --max-batch-tokens, following the load)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the core's core.device")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the model (default: the bundled one)")
    parser.add_argument("--core-layers", type=int, default=0,
                        help="cloak only the model's first N decoder layers (0 = all): with 1, the core's forward is "
                             "almost free and the figure is the edge's and the transport's ceiling")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = root / "bundle.key"
        create_key_file(key)
        ckpt = load_checkpoint(args.checkpoint or bundled_model_path())
        if args.core_layers:
            keep_first_layers(ckpt, args.core_layers)
        cloak(ckpt, root / "edge", root / "core", KeySource(key_file=key), MODEL_NAME, progress=False)
        eos = eos_ids(ckpt)
        del ckpt
        alone = core_forward_ms(root / "core", args.threads, args.quantize, args.dtype, device=args.device)
        print("the core alone, one decode forward: " + ", ".join(
            f"{rows} rows {ms:.1f} ms" for rows, ms in alone.items())
            + f"; at most {16 * alone[1] / alone[16]:.2f}x from 16 streams over 1")
        torch.set_num_threads(1)  # the clients' process: keep its torch out of the servers' way
        results = {wait: measure(root, key, eos, args, wait) for wait in (0.0, args.wait_ms)}
    print(f"\n{'figure':<24}" + "".join(f"{f'wait {w:g} ms':>14}" for w in results))
    for name in results[0.0]:
        print(f"{name:<24}" + "".join(f"{r[name]:>14.1f}" for r in results.values()))
    print(f"{'16 streams / 1':<24}" + "".join(
        f"{r['aggregate_tok_s_16'] / r['aggregate_tok_s_1']:>14.2f}" for r in results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
