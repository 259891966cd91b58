"""Decode speed with a JSON schema enforced ÷ without, through real edge and core servers, and the grammar's
per-token mask cost on its own. Both measured in this one run, on the same model and machine.

    python bench/structured_decode.py [--tokens 64] [--repeats 3] [--checkpoint PATH]

Goal: ratio >= 0.9. Without a schema the reply is free text; with one it is a JSON object whose one field is
an unbounded string, so both decode the same number of tokens (EOS is biased away in both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from cloaking.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from edge_proxy.grammar import Grammars, json_schema_grammar  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm, as JSON with a field 'story'."
MODEL_NAME = "bench-model"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
          "additionalProperties": False}


def decode_rate(base_url: str, eos_ids: list[int], tokens: int, schema: dict | None) -> float:
    """-> decode tokens/s of one greedy stream (time after the first token)."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(e): -100 for e in eos_ids}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}
    first = usage = None
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    assert usage and first is not None
    return (usage["completion_tokens"] - 1) / (end - first)


def mask_cost_ms(ckpt, eos_ids: list[int], text: str) -> float:
    """Mean milliseconds to compute the allowed-token mask and advance, teacher-forced over `text`."""
    grammars = Grammars(ckpt.tokenizer, ckpt.model.config.vocab_size, frozenset(eos_ids))
    grammar = json_schema_grammar(SCHEMA)
    grammars.constraint(grammar, "bench")  # compile once (the cache's job); then time the per-token work
    ids = ckpt.tokenizer(text, add_special_tokens=False)["input_ids"]
    constraint = grammars.constraint(grammar, "bench")
    start = time.perf_counter()
    for token in ids:
        allowed = constraint.allowed()
        assert allowed[token], "the text must follow the schema"
        constraint.advance(token)
    return (time.perf_counter() - start) / len(ids) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="HF folder or GGUF (default: bundled SmolLM2)")
    parser.add_argument("--out", default="bench/results/structured_decode.json")
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint or bundled_model_path())
    eos_ids = sorted({int(ckpt.tokenizer.eos_token_id)})
    story = json.dumps({"story": "The keeper climbed the stairs as the storm rose over the rocks. " * 6})
    mask_ms = mask_cost_ms(ckpt, eos_ids, story.replace('":"', '": "'))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        key = tmp_path / "bundle.key"
        create_key_file(key)
        cloak(ckpt, tmp_path / "edge", tmp_path / "core", KeySource(key_file=key), MODEL_NAME, progress=False)
        del ckpt
        pair = VeilPair(tmp_path, tmp_path / "edge", tmp_path / "core", key, MODEL_NAME)
        try:
            decode_rate(pair.base_url, eos_ids, 4, None)  # warm-up, and the schema's compile:
            decode_rate(pair.base_url, eos_ids, 4, SCHEMA)
            plain, schema = [], []
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
                plain.append(decode_rate(pair.base_url, eos_ids, args.tokens, None))
                schema.append(decode_rate(pair.base_url, eos_ids, args.tokens, SCHEMA))
        finally:
            pair.stop()
    a, b = statistics.median(plain), statistics.median(schema)
    print(f"decode without a schema: {a:.1f} tok/s; with a json_schema: {b:.1f} tok/s; ratio {b / a:.2f} (goal >= 0.9)")
    print(f"grammar mask + advance per token: {mask_ms:.3f} ms (teacher-forced, compiled grammar)")
    result = {"tokens": args.tokens, "repeats": args.repeats, "plain_tok_s": a, "json_schema_tok_s": b,
              "ratio": b / a, "mask_ms_per_token": mask_ms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
