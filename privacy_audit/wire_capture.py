"""What an on-path observer records between edge and core, and what it can parse out of it.

`record` turns each traced request into the bytes that cross the wire, built with the real
code: the plaintext step frames are `veil.wire.encode_request` / `encode_result` of exactly
the rows the core received and returned (trace.Observed); sealed, each request is one session
of `veil.channel` (the HPKE hello, the core's reply, every step frame and its answer, and the
sealed close), and every frame is opened by the other end's channel as a check that the bytes
are the ones the real ends exchange. Insecure (`--insecure-transport`, for comparison only) the
plaintext frames themselves are what the observer records: the wire before sealing.

`observe` is the observer's parser. Plaintext frames parse with `veil.wire`. Sealed frames do
not, so the observer does the best it can: it strips the 8-byte sequence number and the 16-byte
tag and reads the rest as if it were a plaintext frame whose header it cannot see: the header
is shorter than one row (2,304 bytes for d = 576), so the number of rows is
floor((len − 4) / 4d) and the last rows·4d bytes are taken as little-endian f32.

`search` looks for the rows' own bytes anywhere in a recording, and `metadata` measures what the
sealed stream still shows: frame counts and sizes.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import x25519

from privacy_audit.trace import Observed
from veil import wire
from veil.channel import CoreKeys, EdgeHello, open_hello
from veil.errors import InvalidRequest
from veil.identity import CoreIdentity, raw_public
from veil.wire import StepRequest, StepResult

SEQ_BYTES, TAG_BYTES = 8, 16  # veil.channel's frame: u64 seq || AES-GCM ciphertext || tag
LEN_BYTES = 4  # veil.wire's frame: u32 header length || msgpack header || rows
CLAMP = 1e4  # bytes read as f32 where there are none: non-finite values -> 0, the rest clamped, so sums stay finite


@dataclasses.dataclass(slots=True)
class Exchange:
    """One request's session as it crosses the wire, in order."""

    steps: list[tuple[bytes, bytes]]  # (edge -> core frame, core -> edge frame) per step
    hello: bytes = b""  # sealed only: the HPKE hello body (POST /v1/sessions)
    hello_reply: bytes = b""  # sealed only: the core's half of the key exchange
    close: bytes = b""  # sealed only: the sealed close (DELETE /v1/sessions/{sid})

    def parts(self) -> list[bytes]:
        return [self.hello, self.hello_reply, *(b for pair in self.steps for b in pair), self.close]


class Endpoints:
    """A core identity and an enrolled edge key for one deployment (fresh keys; the audit has no others)."""

    def __init__(self, bundle_id: str, post_quantum: bool = False):
        self.bundle_id, self.post_quantum = bundle_id, post_quantum
        self.core = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
        self.edge = x25519.X25519PrivateKey.generate()
        self.keys = CoreKeys(self.core.public, self.core.pq_key.public_key())
        self.enrolled = {raw_public(self.edge.public_key())}


def _steps(obs: Observed) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(offset, rows sent, row returned) per step: the prefill, then one fed-back token per step."""
    out = [(0, obs.received[:obs.prompt_len], obs.returned[:1])]
    for i in range(1, obs.returned.shape[0]):
        at = obs.prompt_len + i - 1
        out.append((at, obs.received[at:at + 1], obs.returned[i:i + 1]))
    return out


def record(observed: Sequence[Observed], ends: Endpoints, sealed: bool) -> list[Exchange]:
    """Every request's wire bytes: sealed with veil.channel, or the plaintext veil.wire frames."""
    out = []
    for obs in observed:
        sid, rid = secrets.token_hex(16), secrets.token_hex(8)  # as the edge makes them
        if not sealed:
            steps = []
            for offset, rows, back in _steps(obs):
                req = StepRequest(sid, offset, rows, request_id=rid, bundle_id=ends.bundle_id)
                res = StepResult(sid, offset + rows.shape[0], back)
                steps.append((wire.encode_request(req), wire.encode_result(res)))
            out.append(Exchange(steps))
            continue
        hello = EdgeHello(ends.edge, ends.keys, sid, ends.bundle_id, post_quantum=ends.post_quantum)
        reply, core = open_hello(hello.body, [ends.core], ends.enrolled).accept()
        edge = hello.finish(reply)
        locker = secrets.token_bytes(32)
        steps = []
        for i, (offset, rows, back) in enumerate(_steps(obs)):
            req = StepRequest(sid, offset, rows, request_id=rid, bundle_id=ends.bundle_id,
                              locker_key=locker if i == 0 else None)  # the first frame carries the locker key
            plain = wire.encode_request(req)
            frame = edge.seal("step", plain)
            seq = edge.sent - 1
            assert core.open("step", frame) == plain
            answer_plain = wire.encode_result(StepResult(sid, offset + rows.shape[0], back))
            answer = core.seal("step", answer_plain, seq=seq)
            assert edge.open("step", answer, seq=seq) == answer_plain
            steps.append((frame, answer))
        close = edge.seal("close", b"")
        assert core.open("close", close) == b""
        out.append(Exchange(steps, hello.body, reply, close))
    return out


def _raw_rows(frame: bytes, dim: int) -> torch.Tensor:
    """A sealed frame read as the observer can: seq and tag stripped, the trailing whole rows as f32."""
    body = frame[SEQ_BYTES:len(frame) - TAG_BYTES]
    try:  # would it parse as a plaintext frame? (for ciphertext, practically never)
        return wire.decode_request(body).hidden.float()
    except (InvalidRequest, ValueError, TypeError, KeyError):
        pass
    row = 4 * dim
    n = max(0, (len(body) - LEN_BYTES) // row)
    raw = np.frombuffer(body[len(body) - n * row:], dtype="<f4").reshape(n, dim)
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes hold NaNs and infinities
        x = torch.from_numpy(np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    return x.clamp(-CLAMP, CLAMP).float()


def observe(exchanges: Sequence[Exchange], dim: int, sealed: bool) -> list[Observed]:
    """The observer's parse of each session: prompt rows, fed-back rows and returned rows, as Observed."""
    out = []
    for ex in exchanges:
        if sealed:
            sent = [_raw_rows(a, dim) for a, _ in ex.steps]
            back = [_raw_rows(b, dim) for _, b in ex.steps]
        else:
            sent = [wire.decode_request(a).hidden.float() for a, _ in ex.steps]
            back = [wire.decode_result(b).hidden.float() for _, b in ex.steps]
        back = [b[-1:] if b.shape[0] else torch.zeros(1, dim) for b in back]
        out.append(Observed(sent[0].shape[0], torch.cat(sent), torch.cat(back)))
    return out


# ---- what the bytes show -------------------------------------------------------------------------


def _windows(rows: torch.Tensor) -> np.ndarray:
    """Every 8-byte window of every row at a 4-byte (f32) boundary, as u64, without degenerate ones
    (a zero or repeated f32 half could match framing bytes by accident)."""
    u = rows.detach().float().contiguous().numpy().view("<u4").astype(np.uint64)
    lo, hi = u[:, :-1], u[:, 1:]
    ok = (lo != 0) & (hi != 0) & (lo != hi) & (lo != 0x80000000) & (hi != 0x80000000)
    return np.unique((lo | (hi << np.uint64(32)))[ok])


def search(exchanges: Sequence[Exchange], rows: torch.Tensor) -> dict[str, Any]:
    """How many of the rows' 8-byte windows occur anywhere in the recording, at any byte offset.

    A row that crossed the wire in clear is found whole; one that did not leaves no window behind
    (chance: about (recorded bytes · windows) / 2⁶⁴, below 1e-4 here)."""
    needles = _windows(rows)
    blob = b"".join(p for ex in exchanges for p in ex.parts())
    found = np.zeros(len(needles), dtype=bool)
    for shift in range(8):
        n = (len(blob) - shift) // 8
        if n <= 0 or not len(needles):
            continue
        hay = np.frombuffer(blob, dtype="<u8", count=n, offset=shift)
        at = np.searchsorted(needles, hay).clip(max=len(needles) - 1)
        hit = needles[at] == hay
        found[at[hit]] = True
    row_bytes = rows.detach().float().contiguous().numpy().tobytes()
    whole = sum(blob.find(row_bytes[i:i + 4 * rows.shape[1]]) >= 0
                for i in range(0, min(len(row_bytes), 64 * 4 * rows.shape[1]), 4 * rows.shape[1]))
    return {"recorded_bytes": len(blob), "rows": int(rows.shape[0]), "windows": int(len(needles)),
            "windows_found": int(found.sum()), "whole_rows_checked": min(64, int(rows.shape[0])),
            "whole_rows_found": int(whole)}


def metadata(exchanges: Sequence[Exchange], truth_prompt: Sequence[int], truth_reply: Sequence[int],
             dim: int) -> dict[str, Any]:
    """What the sealed stream shows without keys: sizes and counts, and what they give away."""
    row = 4 * dim
    first = [len(ex.steps[0][0]) for ex in exchanges]
    guess = [(n - SEQ_BYTES - TAG_BYTES - LEN_BYTES) // row for n in first]
    header = [n - SEQ_BYTES - TAG_BYTES - LEN_BYTES - p * row for n, p in zip(first, truth_prompt)]
    later = sorted({len(a) for ex in exchanges for a, _ in ex.steps[1:]})
    answers = sorted({len(b) for ex in exchanges for _, b in ex.steps})
    return {
        "requests": len(exchanges),
        "prompt_length_exact": sum(g == p for g, p in zip(guess, truth_prompt)),
        "reply_length_exact": sum(len(ex.steps) == r for ex, r in zip(exchanges, truth_reply)),
        "hello_bytes": sorted({len(ex.hello) for ex in exchanges}),
        "hello_reply_bytes": sorted({len(ex.hello_reply) for ex in exchanges}),
        "close_bytes": sorted({len(ex.close) for ex in exchanges}),
        "first_frame_header_bytes": [min(header), max(header)] if header else [],
        "decode_frame_bytes": later,
        "answer_frame_bytes": answers,
        "row_bytes": row,
    }


def entropy_bits_per_byte(exchanges: Sequence[Exchange]) -> float:
    """Empirical byte entropy of the step frames (8 for uniformly random bytes)."""
    blob = b"".join(b for ex in exchanges for pair in ex.steps for b in pair)
    counts = np.bincount(np.frombuffer(blob, dtype=np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())

