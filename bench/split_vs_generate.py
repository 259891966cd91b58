"""Decode speed and time to first token: plain transformers `generate` vs Veil's split path.

Both run in this one invocation on the same model and machine: (a) `generate` in this
process; (b) a real `veil core` and `veil edge` on loopback ports, streamed over HTTP.
Prints both, the ratio b/a, and where the split path spends each token.

    python bench/split_vs_generate.py [--tokens 64] [--repeats 3] [--checkpoint PATH] [--quantize int8]
                                      [--edge-quantize int8] [--speculative K] [--prompt TEXT]

With --speculative K the edge drafts up to K tokens per step from the request's own tokens
(edge.speculative_tokens), and `generate` is also timed with prompt-lookup drafting of K tokens
(`prompt_lookup_num_tokens`), the same idea in transformers: b/a is against plain `generate`,
b/a' against `generate` that drafts too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak, random_orthogonal  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil import wire  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODEL_NAME = "bench-model"


def bench_generate(ckpt, prompt_ids: list[int], tokens: int, lookup: int = 0) -> tuple[float, float]:
    """-> (time to first token s, decode tokens/s) for greedy `generate`, drafting `lookup` tokens if > 0."""
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    drafting = {"prompt_lookup_num_tokens": lookup} if lookup else {}

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            ckpt.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=ckpt.tokenizer.pad_token_id or 0, **drafting)
        return time.perf_counter() - start

    run(2)  # warm-up
    ttft = run(1)
    total = run(tokens)
    return ttft, (tokens - 1) / (total - ttft)


def bench_split(base_url: str, eos_ids: list[int], tokens: int, prompt: str = PROMPT) -> tuple[float, float]:
    """-> (time to first token s, decode tokens/s) streamed through edge and core."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(e): -100 for e in eos_ids}}  # like min_new_tokens: always the full count
    start = time.perf_counter()
    first = None
    usage = None
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    assert usage and usage["completion_tokens"] == tokens, usage
    ttft = first - start
    return ttft, (tokens - 1) / (end - first)


def bench_generate_batch(ckpt, prompt_ids: list[int], tokens: int, streams: int) -> float:
    """-> aggregate decode tokens/s of one batched `generate` over `streams` copies of the prompt."""
    ids = torch.tensor([prompt_ids] * streams)
    start = time.perf_counter()
    with torch.inference_mode():
        ckpt.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                            do_sample=False, pad_token_id=ckpt.tokenizer.pad_token_id or 0)
    return streams * tokens / (time.perf_counter() - start)


def bench_split_concurrent(base_url: str, eos_ids: list[int], tokens: int, streams: int) -> float:
    """-> aggregate tokens/s of `streams` simultaneous streams (the core batches their steps)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: bench_split(base_url, eos_ids, tokens), range(streams)))
    return streams * tokens / (time.perf_counter() - start)


def _histogram_mean(metrics: str, name: str) -> tuple[float, float]:
    total = float(re.search(rf"^{name}_sum (\S+)$", metrics, re.M).group(1))
    count = float(re.search(rf"^{name}_count (\S+)$", metrics, re.M).group(1))
    return total, count


def draft_counts(edge_url: str, before: str) -> dict[str, float]:
    """Draft tokens kept and rejected since `before` (edge metrics)."""
    after = httpx.get(edge_url + "/metrics").text

    def count(metrics: str, outcome: str) -> float:
        found = re.search(rf'^veil_edge_draft_tokens_total{{outcome="{outcome}"}} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    return {o: count(after, o) - count(before, o) for o in ("accepted", "rejected")}


def per_token_costs(edge_url: str, before: str, d: int) -> dict[str, float]:
    after = httpx.get(edge_url + "/metrics").text
    out = {}
    for key, name in (("step_roundtrip_ms", "veil_edge_step_roundtrip_seconds"),
                      ("core_compute_ms", "veil_edge_core_compute_seconds"),
                      ("edge_head_ms", "veil_edge_head_seconds")):
        s1, c1 = _histogram_mean(after, name)
        s0, c0 = _histogram_mean(before, name)
        out[key] = (s1 - s0) / max(c1 - c0, 1) * 1000
        if name == "veil_edge_step_roundtrip_seconds":
            out["steps"] = c1 - c0
    out["transport_and_http_ms"] = out["step_roundtrip_ms"] - out["core_compute_ms"]
    # Serialization: one decode step's frames, both directions, as the edge and core do them.
    x = torch.randn(1, d)
    req = wire.StepRequest("s" * 32, 100, x, bundle_id="b" * 32)
    res = wire.StepResult("s" * 32, 101, x)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        wire.decode_request(wire.encode_request(req))
        wire.decode_result(wire.encode_result(res))
    out["serialization_ms"] = (time.perf_counter() - start) / n * 1000
    # Rotation is folded into the edge's embedding table and LM head at load, so it costs
    # nothing per token; this is what an explicit Q·x and Qᵀ·h' would cost instead.
    q = random_orthogonal(d, seed=0).float()
    start = time.perf_counter()
    for _ in range(n):
        _ = x @ q.T
        _ = x @ q
    out["explicit_rotation_ms_if_not_folded"] = (time.perf_counter() - start) / n * 1000
    out["rotation_ms"] = 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams for the throughput part")
    parser.add_argument("--checkpoint", default=None, help="HF folder or GGUF (default: bundled SmolLM2)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="the core's core.quantize")
    parser.add_argument("--edge-quantize", default="none", choices=("none", "int8"), help="the edge's edge.quantize")
    parser.add_argument("--speculative", type=int, default=0, help="the edge's edge.speculative_tokens")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--out", default="bench/results/split_vs_generate.json")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint or bundled_model_path())
    prompt_ids = ckpt.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                    add_generation_prompt=True, tokenize=False)
    prompt_ids = ckpt.tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    print(f"model: {args.checkpoint or 'bundled SmolLM2-135M-Instruct'}; prompt {len(prompt_ids)} tokens; "
          f"{args.tokens} new tokens; torch threads {torch.get_num_threads()}", flush=True)

    runs_a = [bench_generate(ckpt, prompt_ids, args.tokens) for _ in range(args.repeats)]
    ttft_a = statistics.median(r[0] for r in runs_a)
    tps_a = statistics.median(r[1] for r in runs_a)
    print(f"(a) transformers generate: ttft {ttft_a * 1000:.1f} ms, decode {tps_a:.1f} tok/s", flush=True)
    tps_lookup = None
    if args.speculative:
        tps_lookup = statistics.median(bench_generate(ckpt, prompt_ids, args.tokens, args.speculative)[1]
                                       for _ in range(args.repeats))
        print(f"(a') transformers generate, prompt lookup of {args.speculative}: decode {tps_lookup:.1f} tok/s",
              flush=True)
    batch_a = bench_generate_batch(ckpt, prompt_ids, args.tokens, args.streams)
    print(f"(a) transformers generate, batch of {args.streams}: {batch_a:.1f} tok/s in all", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        key = tmp_path / "bundle.key"
        create_key_file(key)
        cloak(ckpt, tmp_path / "edge", tmp_path / "core", KeySource(key_file=key), MODEL_NAME, progress=False)
        eos_ids = sorted({int(ckpt.tokenizer.eos_token_id)} | set(
            [ckpt.model.generation_config.eos_token_id] if isinstance(ckpt.model.generation_config.eos_token_id, int)
            else ckpt.model.generation_config.eos_token_id or []))
        d = ckpt.model.config.hidden_size
        del ckpt  # the servers hold their own copies; free this process's
        pair = VeilPair(tmp_path, tmp_path / "edge", tmp_path / "core", key, MODEL_NAME,
                        core_env={"VEIL_CORE_QUANTIZE": args.quantize},
                        edge_env={"VEIL_EDGE_SPECULATIVE_TOKENS": str(args.speculative),
                                  "VEIL_EDGE_QUANTIZE": args.edge_quantize})
        try:
            bench_split(pair.base_url, eos_ids, 4, args.prompt)  # warm-up
            before = httpx.get(pair.edge.url + "/metrics").text
            runs_b = [bench_split(pair.base_url, eos_ids, args.tokens, args.prompt) for _ in range(args.repeats)]
            costs = per_token_costs(pair.edge.url, before, d)
            drafts = draft_counts(pair.edge.url, before)
            batch_b = bench_split_concurrent(pair.base_url, eos_ids, args.tokens, args.streams)
        finally:
            pair.stop()
    ttft_b = statistics.median(r[0] for r in runs_b)
    tps_b = statistics.median(r[1] for r in runs_b)
    print(f"(b) Veil split path (edge + core on loopback): ttft {ttft_b * 1000:.1f} ms, decode {tps_b:.1f} tok/s")
    print(f"ratio b/a: decode {tps_b / tps_a:.2f}x, time to first token {ttft_a / ttft_b:.2f}x (higher is faster)")
    if tps_lookup is not None:
        print(f"ratio b/a': decode {tps_b / tps_lookup:.2f}x against generate drafting the same way")
        kept = drafts["accepted"] / max(drafts["accepted"] + drafts["rejected"], 1)
        print(f"drafts: {drafts['accepted']:.0f} kept, {drafts['rejected']:.0f} rejected ({kept:.0%} kept); "
              f"{args.repeats * (args.tokens - 1) / max(costs['steps'] - args.repeats, 1):.2f} tokens per decode step")
    print("split path per step: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    print(f"{args.streams} concurrent streams: Veil {batch_b:.1f} tok/s in all (continuous batching) vs batched "
          f"generate {batch_a:.1f} tok/s: ratio {batch_b / batch_a:.2f}x")
    result = {"tokens": args.tokens, "repeats": args.repeats, "quantize": args.quantize,
              "edge_quantize": args.edge_quantize,
              "speculative": args.speculative, "generate_prompt_lookup_tok_s": tps_lookup, "drafts": drafts,
              "generate": {"ttft_s": ttft_a, "decode_tok_s": tps_a},
              "split": {"ttft_s": ttft_b, "decode_tok_s": tps_b}, "decode_ratio": tps_b / tps_a,
              "ttft_ratio": ttft_a / ttft_b, "per_token_ms": costs,
              "concurrent": {"streams": args.streams, "generate_batch_tok_s": batch_a, "split_tok_s": batch_b,
                             "ratio": batch_b / batch_a}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
