"""One-stream decode speed: llama.cpp on the bundled GGUF against Veil's split path on the same file.

Both run in this one invocation, one after the other (Veil first), on the same machine with the same number of threads:
(a) llama.cpp (`llama-cpp-python`) decoding the GGUF as it is shipped (SmolLM2-135M, Q4_1); (b) a real
`veil core` and `veil edge` on loopback, the core and the edge each given the same thread count, serving the
same file cloaked (Veil dequantizes it: its core runs float32, and has no int8 or int4 path yet). Greedy, a
fixed count of tokens (end-of-sequence suppressed on both sides). Prints both and Veil ÷ llama.cpp.

    make bench-llamacpp    # installs llama-cpp-python (built from source here) and runs this
    python bench/llamacpp.py [--tokens 64] [--threads 2] [--repeats 3]
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

from bench.split_vs_generate import MODEL_NAME, PROMPT, bench_split  # noqa: E402
from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak, eos_ids  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402


def bench_llamacpp(gguf: Path, tokens: int, threads: int, repeats: int) -> tuple[float, float]:
    """-> (time to first token s, decode tokens/s), the median of `repeats` greedy streams."""
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run `make bench-llamacpp`")
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    bias = {llm.token_eos(): -100.0}  # like min_new_tokens: always the full count

    def once() -> tuple[float, float]:
        llm.reset()  # no prompt cache from the previous run
        start = time.perf_counter()
        first = None
        count = 0
        for chunk in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, stream=True,
                                                logit_bias=bias):
            if chunk["choices"][0]["delta"].get("content"):
                count += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None and count >= tokens - 2, count  # a chunk per token, give or take the template's
        return first - start, (count - 1) / (end - first)

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf = bundled_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = root / "bundle.key"
        create_key_file(key)
        ckpt = load_checkpoint(gguf)
        cloak(ckpt, root / "edge", root / "core", KeySource(key_file=key), MODEL_NAME, progress=False)
        eos = eos_ids(ckpt)
        del ckpt
        threads = str(args.threads)
        pair = VeilPair(root / "run", root / "edge", root / "core", key, MODEL_NAME,
                        core_env={"VEIL_CORE_THREADS": threads, "VEIL_LOG_LEVEL": "warning"},
                        edge_env={"VEIL_EDGE_THREADS": threads})
        try:
            bench_split(pair.base_url, eos, 8)  # warm-up
            runs = [bench_split(pair.base_url, eos, args.tokens) for _ in range(args.repeats)]
        finally:
            pair.stop()
    ttft_b, tok_b = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    # llama.cpp second, once Veil's servers have stopped, in this process: nothing of it is left running for Veil
    ttft_a, tok_a = bench_llamacpp(gguf, args.tokens, args.threads, args.repeats)
    print(f"\n{gguf.name}, {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'':<34}{'first token':>14}{'decode':>14}")
    print(f"{'(a) llama.cpp, the GGUF as shipped':<34}{ttft_a * 1000:>11.0f} ms{tok_a:>10.1f} tok/s")
    print(f"{'(b) Veil split, float32 core':<34}{ttft_b * 1000:>11.0f} ms{tok_b:>10.1f} tok/s")
    print(f"decode b/a = {tok_b / tok_a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
