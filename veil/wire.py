"""The step wire format shared by edge and core: a msgpack header plus raw tensor bytes.

A frame is `u32 big-endian header length | msgpack header | little-endian array bytes`.
The whole frame is the plaintext that `veil.channel` seals end to end, so its shape does not
depend on the transport around it.
"""

from __future__ import annotations

import dataclasses
import struct
import sys

import msgpack
import torch

from veil.errors import InvalidRequest

VERSION = 1
CONTENT_TYPE = "application/x-veil-step"
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024
_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
assert sys.byteorder == "little", "the wire format writes the host's bytes as little-endian"


@dataclasses.dataclass(slots=True)
class StepRequest:
    """New tokens' rotated hidden states for one session, starting at `offset`, for one cloaked bundle."""

    session: str
    offset: int
    hidden: torch.Tensor  # [n, d] rotated input states
    want: list[int] = dataclasses.field(default_factory=lambda: [-1])  # rows to return, relative to the new tokens
    request_id: str = ""
    # the bundle whose rotation the states are in; a core serving another bundle refuses the step
    bundle_id: str = dataclasses.field(kw_only=True)
    # the session's locker key, sent in the first frame of each channel (frames are sealed end to end)
    locker_key: bytes | None = dataclasses.field(default=None, kw_only=True)


@dataclasses.dataclass(slots=True)
class StepResult:
    """Rotated residual-stream states of the wanted positions, and the session length after the step."""

    session: str
    length: int
    hidden: torch.Tensor  # [len(want), d]
    compute_ms: float = 0.0
    queue_ms: float = 0.0


def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    assert t.dim() == 2, "wire tensors are [rows, dim]"
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _NAMES:
        raise InvalidRequest(f"unsupported tensor dtype {t.dtype}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return _NAMES[t.dtype], raw.numpy().tobytes()


def _frame(header: dict, payload: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return _LEN.pack(len(head)) + head + payload


def _unframe(data: bytes) -> tuple[dict, memoryview]:
    if len(data) < _LEN.size:
        raise InvalidRequest("step frame is truncated")
    (n,) = _LEN.unpack_from(data)
    if n > _MAX_HEADER or _LEN.size + n > len(data):
        raise InvalidRequest("step frame header length is invalid")
    try:
        header = msgpack.unpackb(data[_LEN.size : _LEN.size + n], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvalidRequest("step frame header is not valid msgpack") from exc
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise InvalidRequest(f"step frame must be a version {VERSION} header")
    return header, memoryview(data)[_LEN.size + n :]


def _tensor(header: dict, payload: memoryview) -> torch.Tensor:
    try:
        rows, dim, dtype = int(header["rows"]), int(header["dim"]), _DTYPES[header["dtype"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest("step frame needs rows, dim and a known dtype") from exc
    itemsize = torch.empty((), dtype=dtype).element_size()
    if rows < 0 or dim <= 0 or rows * dim * itemsize != len(payload):
        raise InvalidRequest("step frame payload size does not match rows x dim")
    if rows == 0:
        return torch.empty((0, dim), dtype=dtype)
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = torch.frombuffer(bytearray(payload), dtype=raw_dtype)
    return flat.view(dtype).view(rows, dim)


def encode_request(req: StepRequest) -> bytes:
    dtype, payload = _tensor_bytes(req.hidden)
    header = {
        "v": VERSION,
        "session": req.session,
        "bundle": req.bundle_id,
        "offset": req.offset,
        "want": req.want,
        "rid": req.request_id,
        "rows": req.hidden.shape[0],
        "dim": req.hidden.shape[1],
        "dtype": dtype,
    }
    if req.locker_key is not None:
        header["locker"] = req.locker_key
    return _frame(header, payload)


def decode_request(data: bytes) -> StepRequest:
    header, payload = _unframe(data)
    session, offset, want = header.get("session"), header.get("offset"), header.get("want", [-1])
    if not isinstance(session, str) or not 8 <= len(session) <= 128:
        raise InvalidRequest("step needs a session id of 8..128 characters")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("step offset must be a non-negative integer")
    bundle = header.get("bundle")
    if not isinstance(bundle, str) or not 1 <= len(bundle) <= 128:
        raise InvalidRequest("step needs the bundle id its states belong to")
    locker = header.get("locker")
    if locker is not None and (not isinstance(locker, bytes) or len(locker) != 32):
        raise InvalidRequest("a step's locker key must be 32 bytes")
    hidden = _tensor(header, payload)
    if hidden.shape[0] == 0:
        raise InvalidRequest("step carries no tokens")
    n = hidden.shape[0]
    if not isinstance(want, list) or not want or not all(isinstance(i, int) and -n <= i < n for i in want):
        raise InvalidRequest(f"step want must list row indices in [-{n}, {n})")
    return StepRequest(session, offset, hidden, want, str(header.get("rid", ""))[:64], bundle_id=bundle,
                       locker_key=locker)


def encode_result(res: StepResult) -> bytes:
    dtype, payload = _tensor_bytes(res.hidden)
    header = {
        "v": VERSION,
        "session": res.session,
        "length": res.length,
        "rows": res.hidden.shape[0],
        "dim": res.hidden.shape[1],
        "dtype": dtype,
        "compute_ms": round(res.compute_ms, 3),
        "queue_ms": round(res.queue_ms, 3),
    }
    return _frame(header, payload)


def decode_result(data: bytes) -> StepResult:
    header, payload = _unframe(data)
    return StepResult(
        session=str(header.get("session", "")),
        length=int(header.get("length", 0)),
        hidden=_tensor(header, payload),
        compute_ms=float(header.get("compute_ms", 0.0)),
        queue_ms=float(header.get("queue_ms", 0.0)),
    )
