"""What sealing the step frames end to end costs: plain framing vs framing + AES-256-GCM, and the handshake.

One run measures, on this machine's CPUs:
  1. one step's full round of framing, per token, at hidden sizes 576 and 4096 (f32 rows):
     (a) plain: encode_request -> decode_request (core) -> encode_result -> decode_result (edge);
     (b) sealed: the same plus edge seal -> core open -> core seal (same seq) -> edge open.
     A decode step carries one row each way; a prefill step carries --prefill-rows rows to the core
     and gets the last one back. Prints (a), (b), the added cost b - a and the ratio b/a.
  2. one session's handshake: X25519 HPKE hello vs the MLKEM768-X25519 hybrid
     (EdgeHello + open_hello + accept + finish), and the hello and reply sizes.

Medians over --repeats repeats of --iterations rounds each (prefill rounds: --iterations / 50), after a
warm-up. The default run takes well under a minute; raise --repeats / --iterations to measure longer.
The goal (added cost per decode token at 4096) is printed next to the measured value, not enforced.

    python bench/seal_cost.py [--repeats 7] [--iterations 1000] [--handshakes 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography  # noqa: E402
import torch  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import x25519  # noqa: E402

from veil import wire  # noqa: E402
from veil.channel import Channel, CoreKeys, EdgeHello, open_hello  # noqa: E402
from veil.identity import CoreIdentity, raw_public  # noqa: E402

SIZES = (576, 4096)  # SmolLM2-135M's hidden size, and a 7B-class one
GOAL_ADDED_MS = 0.3  # the goal: added cost per decode token at 4096
GOAL_SIZE = 4096
SID = "s" * 32
BUNDLE = "b" * 32
OP = "step"


class Keys:
    """A core identity and one enrolled edge key, made once per run."""

    def __init__(self) -> None:
        self.core = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
        self.edge = x25519.X25519PrivateKey.generate()
        self.enrolled = {raw_public(self.edge.public_key())}
        self.core_keys = CoreKeys(self.core.public, self.core.pq_key.public_key())

    def handshake(self, post_quantum: bool) -> tuple[Channel, Channel, int, int]:
        """(edge channel, core channel, hello body bytes, reply bytes) of one full handshake."""
        hello = EdgeHello(self.edge, self.core_keys, SID, BUNDLE, post_quantum=post_quantum)
        reply, core_channel = open_hello(hello.body, [self.core], self.enrolled).accept()
        return hello.finish(reply), core_channel, len(hello.body), len(reply)


def _interleaved(fns: dict[str, Callable[[], object]], iterations: int, repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns within each repeat (so drift hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            runs[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(r) for name, r in runs.items()}


def framing_case(keys: Keys, dim: int, rows: int, iterations: int, repeats: int) -> dict[str, float]:
    """Per-token cost of one step of `rows` new tokens (one row back), plain and sealed."""
    gen = torch.Generator().manual_seed(dim * 1000 + rows)
    req = wire.StepRequest(SID, 100, torch.randn(rows, dim, generator=gen), bundle_id=BUNDLE)
    res = wire.StepResult(SID, 100 + rows, torch.randn(1, dim, generator=gen))
    edge, core, _, _ = keys.handshake(post_quantum=False)

    def plain() -> wire.StepResult:
        wire.decode_request(wire.encode_request(req))
        return wire.decode_result(wire.encode_result(res))

    def sealed() -> wire.StepResult:
        frame = edge.seal(OP, wire.encode_request(req))
        seq = edge.sent - 1
        wire.decode_request(core.open(OP, frame))
        answer = core.seal(OP, wire.encode_result(res), seq=seq)
        return wire.decode_result(edge.open(OP, answer, seq=seq))

    # the sealed round must carry the same bytes the plain one does, or the timing means nothing
    seq0 = edge.sent
    got = wire.decode_request(core.open(OP, edge.seal(OP, wire.encode_request(req))))
    back = sealed()
    if not (torch.equal(got.hidden, req.hidden) and torch.equal(back.hidden, res.hidden) and edge.sent == seq0 + 2
            and core.received == edge.sent):
        raise RuntimeError("a sealed round did not return what it sent")

    times = _interleaved({"plain": plain, "sealed": sealed}, iterations, repeats, warmup=max(2, iterations // 10))
    plain_us, sealed_us = times["plain"] / rows * 1e6, times["sealed"] / rows * 1e6
    request_bytes = len(wire.encode_request(req))
    return {"dim": dim, "rows": rows, "iterations": iterations, "plain_us_per_token": plain_us,
            "sealed_us_per_token": sealed_us, "added_ms_per_token": (sealed_us - plain_us) / 1000,
            "ratio": sealed_us / plain_us, "request_frame_bytes": request_bytes,
            "sealed_request_frame_bytes": request_bytes + 8 + 16}


def handshake_cases(keys: Keys, iterations: int, repeats: int) -> dict[str, dict[str, float]]:
    """X25519 and hybrid handshakes, taking turns within each repeat."""
    fns = {"x25519": lambda: keys.handshake(False), "mlkem768_x25519": lambda: keys.handshake(True)}
    times = _interleaved(fns, iterations, repeats, warmup=max(2, iterations // 10))
    out = {}
    for name, fn in fns.items():
        _, _, hello_bytes, reply_bytes = fn()
        out[name] = {"ms_per_handshake": times[name] * 1000, "hello_bytes": hello_bytes, "reply_bytes": reply_bytes}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case; the median is reported")
    parser.add_argument("--iterations", type=int, default=1000,
                        help="decode rounds per repeat (prefill rounds: this / 50, at least 2)")
    parser.add_argument("--prefill-rows", type=int, default=512, help="rows in the prefill step")
    parser.add_argument("--handshakes", type=int, default=100, help="handshakes per repeat, per KEM")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args()
    if min(args.repeats, args.iterations, args.prefill_rows, args.handshakes) < 1:
        parser.error("--repeats, --iterations, --prefill-rows and --handshakes must be at least 1")

    print(f"python {platform.python_version()}, torch {torch.__version__}, cryptography {cryptography.__version__}; "
          f"{os.cpu_count()} CPUs ({platform.machine()}), torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats} repeats", flush=True)
    keys = Keys()

    framing = []
    prefill_iterations = max(2, args.iterations // 50)
    print("\nframing per token (f32; (a) plain = wire encode/decode both ways, (b) sealed = (a) + AES-256-GCM "
          "seal/open both ways):")
    for kind, rows, iterations in (("decode", 1, args.iterations), ("prefill", args.prefill_rows, prefill_iterations)):
        for dim in SIZES:
            case = framing_case(keys, dim, rows, iterations, args.repeats)
            case["kind"] = kind
            framing.append(case)
            print(f"  {kind:7s} {rows:4d} row(s) x {dim:4d}: (a) plain {case['plain_us_per_token']:9.2f} us/token, "
                  f"(b) sealed {case['sealed_us_per_token']:9.2f} us/token; added {case['added_ms_per_token']:.4f} "
                  f"ms/token, ratio b/a {case['ratio']:.2f}x (request frame {case['request_frame_bytes']} B)",
                  flush=True)
    decode_goal = next(c for c in framing if c["kind"] == "decode" and c["dim"] == GOAL_SIZE)
    met = decode_goal["added_ms_per_token"] <= GOAL_ADDED_MS
    print(f"  goal: added <= {GOAL_ADDED_MS} ms per decode token at {GOAL_SIZE}; measured "
          f"{decode_goal['added_ms_per_token']:.4f} ms: {'met' if met else 'NOT met'}")

    print("\nhandshake per session (EdgeHello + open_hello + accept + finish):")
    handshakes = handshake_cases(keys, args.handshakes, args.repeats)
    classic, hybrid = handshakes["x25519"], handshakes["mlkem768_x25519"]
    for name, case in (("X25519 HPKE        ", classic), ("MLKEM768-X25519    ", hybrid)):
        print(f"  {name}: {case['ms_per_handshake']:.3f} ms, hello {case['hello_bytes']} B, "
              f"reply {case['reply_bytes']} B")
    ratio = hybrid["ms_per_handshake"] / classic["ms_per_handshake"]
    print(f"  ratio hybrid/classic: {ratio:.2f}x time, "
          f"{hybrid['hello_bytes'] / classic['hello_bytes']:.2f}x hello size")

    if args.json:
        result = {"repeats": args.repeats, "iterations": args.iterations, "prefill_iterations": prefill_iterations,
                  "handshakes": args.handshakes, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "framing": framing,
                  "goal": {"added_ms_per_token": GOAL_ADDED_MS, "dim": GOAL_SIZE,
                           "measured_ms_per_token": decode_goal["added_ms_per_token"], "met": met},
                  "handshake": {"x25519": classic, "mlkem768_x25519": hybrid, "hybrid_over_classic": ratio}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
