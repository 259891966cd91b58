"""How long a long prompt's prefill stalls another session's decode: chunked prefill vs whole steps.

One stream decodes (streamed over HTTP through a real edge and core); while it runs, a second client sends a
long prompt. The figure is the longest gap between two of the first stream's tokens while that prefill runs,
measured with `core.prefill_chunk_tokens` 0 (whole steps) and the chunk size given, in this one invocation, on
the same model and machine. Prints both and their ratio.

    python bench/prefill_stall.py [--chunk 512] [--prompt-words 1500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

MODEL_NAME = "bench-model"


def token_times(base_url: str, tokens: int, eos_ids: list[int], out: list[float], started: threading.Event) -> None:
    """Stream `tokens` tokens; append the arrival time of each content chunk to `out`."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "logit_bias": {str(e): -100 for e in eos_ids}}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                out.append(time.perf_counter())
                started.set()


def long_prompt(base_url: str, words: int) -> tuple[float, float]:
    """Send a prompt of about `words` words for one token -> (sent, answered) perf_counter times."""
    text = " ".join(f"word{i % 97}" for i in range(words))
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    sent = time.perf_counter()
    r = httpx.post(base_url + "/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return sent, time.perf_counter()


def worst_gap(base_url: str, eos_ids: list[int], words: int) -> float:
    """The longest gap (s) between the decoding stream's tokens while the long prompt is in the core."""
    times: list[float] = []
    started = threading.Event()
    stream = threading.Thread(target=token_times, args=(base_url, 200, eos_ids, times, started))
    stream.start()
    started.wait(120)
    time.sleep(0.3)  # the stream is in steady decode
    sent, answered = long_prompt(base_url, words)
    stream.join()
    inside = [t for t in times if sent <= t <= answered]
    edges = [max(t for t in times if t < sent)] + inside + [min(t for t in times if t > answered)]
    return max(b - a for a, b in zip(edges, edges[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--prompt-words", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt = load_checkpoint(bundled_model_path())
    eos_ids = [int(ckpt.tokenizer.eos_token_id)]
    prompt_tokens = len(ckpt.tokenizer(" ".join(f"word{i % 97}" for i in range(args.prompt_words)))["input_ids"])
    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        create_key_file(root / "bundle.key")
        cloak(ckpt, root / "edge", root / "core", KeySource(key_file=root / "bundle.key"), MODEL_NAME, progress=False)
        del ckpt
        for chunk in (0, args.chunk):
            home = root / f"chunk-{chunk}"
            home.mkdir()
            pair = VeilPair(home, root / "edge", root / "core", root / "bundle.key", MODEL_NAME,
                            core_env={"VEIL_CORE_PREFILL_CHUNK_TOKENS": str(chunk)})
            try:
                worst_gap(pair.base_url, eos_ids, 50)  # warm-up
                results[chunk] = statistics.median(worst_gap(pair.base_url, eos_ids, args.prompt_words)
                                                   for _ in range(args.repeats))
            finally:
                pair.stop()
            print(f"prefill_chunk_tokens={chunk}: worst gap in the decoding stream {results[chunk] * 1000:.0f} ms "
                  f"while a {prompt_tokens}-token prompt prefills", flush=True)
    print(f"ratio whole ÷ chunked: {results[0] / results[args.chunk]:.2f}x shorter stall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
