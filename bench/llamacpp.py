"""One-stream decode speed: llama.cpp on the bundled GGUF against Veil's split path on the same file.

Both run in this one invocation on the same machine with the same number of threads: (a) llama.cpp
(`llama-cpp-python`, in this process) decoding the GGUF as it is shipped (SmolLM2-135M, Q4_1); (b) a real
`veil core` and `veil edge` on loopback, the core and the edge each given the same thread count, serving the
same file cloaked (Veil dequantizes it), with a float32 core; (c) the same with the core's blocks as int8
(`core.quantize: int8`); (d) int8 on both sides (`edge.quantize: int8` too: the LM head). Greedy, a fixed count
of tokens (end-of-sequence suppressed on both sides).

The speed of a shared VM drifts by a third within minutes, so each of (b)-(d) is timed in turns with llama.cpp:
while one Veil pair runs, its streams alternate with llama.cpp's (one each, the order swapped every round), and
its ratio is the median of its streams ÷ the median of llama.cpp's in the same rounds (issue 15's goal: (d) ÷
llama.cpp >= 0.5). The engine that is not streaming sits idle meanwhile.

    make bench-llamacpp    # installs llama-cpp-python (built from source here) and runs this
    python bench/llamacpp.py [--tokens 64] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.split_vs_generate import MODEL_NAME, PROMPT, bench_split  # noqa: E402
from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak, eos_ids  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

Runs = list[tuple[float, float]]  # (time to first token s, decode tokens/s) per stream


def llamacpp_stream(gguf: Path, tokens: int, threads: int) -> Callable[[], tuple[float, float]]:
    """llama.cpp loaded and warmed up -> a function that streams once: (time to first token s, decode tokens/s)."""
    try:
        import llama_cpp.llama_cpp as low
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run `make bench-llamacpp`")
    # llama.cpp's AMX matmul (an "extra buffer type") crashes on a Sapphire Rapids VM for a prompt of more than one
    # token (a segfault in ggml_backend_amx_mul_mat, 0.3.36); `Llama` does not expose the switch, so its default
    # model parameters are wrapped. Q4_1 has no other extra buffer type on x86, so decoding is unchanged.
    defaults = low.llama_model_default_params

    def without_extra_buffers() -> low.llama_model_params:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    assert not llm.model_params.use_extra_bufts
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
    return once


def in_turns(root: Path, key: Path, eos: list[int], args: argparse.Namespace, core_quantize: str,
             edge_quantize: str, llama: Callable[[], tuple[float, float]]) -> tuple[Runs, Runs]:
    """Veil's split path with `core.quantize` and `edge.quantize` set, its streams alternating with llama.cpp's
    -> (Veil's runs, llama.cpp's runs in the same rounds), each (time to first token s, decode tokens/s)."""
    threads = str(args.threads)
    pair = VeilPair(root / f"run-{core_quantize}-{edge_quantize}", root / "edge", root / "core", key, MODEL_NAME,
                    core_env={"VEIL_CORE_THREADS": threads, "VEIL_LOG_LEVEL": "warning",
                              "VEIL_CORE_QUANTIZE": core_quantize},
                    edge_env={"VEIL_EDGE_THREADS": threads, "VEIL_EDGE_QUANTIZE": edge_quantize})
    veil: Runs = []
    other: Runs = []
    try:
        bench_split(pair.base_url, eos, 8)  # warm-up
        for i in range(args.repeats):
            for turn in ("veil", "llama") if i % 2 == 0 else ("llama", "veil"):
                if turn == "veil":
                    veil.append(bench_split(pair.base_url, eos, args.tokens))
                else:
                    other.append(llama())
    finally:
        pair.stop()
    return veil, other


def _median(runs: Runs, i: int) -> float:
    return statistics.median(r[i] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="streams of each engine per Veil setting")
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
        llama = llamacpp_stream(gguf, args.tokens, args.threads)
        settings = {"(b) Veil split, float32": ("none", "none"), "(c) Veil split, int8 core": ("int8", "none"),
                    "(d) Veil split, int8 core and head": ("int8", "int8")}
        turns = {name: in_turns(root, key, eos, args, core, edge, llama) for name, (core, edge) in settings.items()}
    print(f"\n{gguf.name}, {args.tokens} tokens, {args.threads} threads, medians of {args.repeats} streams each")
    print(f"{'':<38}{'first token':>14}{'decode':>14}{'llama.cpp in turn':>20}{'÷ llama.cpp':>14}")
    everything = [run for _, other in turns.values() for run in other]
    print(f"{'(a) llama.cpp, the GGUF as shipped':<38}{_median(everything, 0) * 1000:>11.0f} ms"
          f"{_median(everything, 1):>10.1f} tok/s")
    for name, (veil, other) in turns.items():
        print(f"{name:<38}{_median(veil, 0) * 1000:>11.0f} ms{_median(veil, 1):>10.1f} tok/s"
              f"{_median(other, 1):>14.1f} tok/s{_median(veil, 1) / _median(other, 1):>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
