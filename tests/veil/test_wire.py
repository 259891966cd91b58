import pytest
import torch

from veil import wire
from veil.errors import InvalidRequest
from veil.wire import StepRequest, StepResult

BUNDLE = "b" * 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_request_round_trip_is_exact(dtype: torch.dtype) -> None:
    hidden = torch.randn(5, 64).to(dtype)
    req = StepRequest("s" * 32, 17, hidden, want=[-1, 0], request_id="rid1", bundle_id=BUNDLE)
    back = wire.decode_request(wire.encode_request(req))
    got = (back.session, back.offset, back.want, back.request_id, back.bundle_id)
    assert got == (req.session, 17, [-1, 0], "rid1", BUNDLE)
    assert back.hidden.dtype == dtype and torch.equal(back.hidden, hidden)


def test_result_round_trip_and_compact_size() -> None:
    res = StepResult("a" * 32, 42, torch.randn(1, 576), compute_ms=1.5, queue_ms=0.25)
    data = wire.encode_result(res)
    assert len(data) < 576 * 4 + 200  # raw floats plus a small header: no JSON for tensors
    back = wire.decode_result(data)
    assert back.length == 42 and torch.equal(back.hidden, res.hidden) and back.compute_ms == 1.5


@pytest.mark.parametrize("mangle, needle", [
    (lambda b: b[:2], "truncated"),
    (lambda b: b"\x00\x10\x00\x00" + b[4:], "header length"),
    (lambda b: b[:-4], "payload size"),
    (lambda b: b[:4] + b"\xc1" + b[5:], "msgpack|version"),
])
def test_malformed_frames_are_400s(mangle, needle: str) -> None:
    data = wire.encode_request(StepRequest("s" * 32, 0, torch.randn(2, 8), bundle_id=BUNDLE))
    with pytest.raises(InvalidRequest, match=needle):
        wire.decode_request(mangle(data))


def test_bad_fields_are_rejected() -> None:
    with pytest.raises(InvalidRequest, match="session id"):
        wire.decode_request(wire.encode_request(StepRequest("x", 0, torch.randn(1, 8), bundle_id=BUNDLE)))
    with pytest.raises(InvalidRequest, match="want"):
        wire.decode_request(wire.encode_request(StepRequest("s" * 32, 0, torch.randn(2, 8), want=[5], bundle_id=BUNDLE)))
    with pytest.raises(InvalidRequest, match="offset"):
        wire.decode_request(wire.encode_request(StepRequest("s" * 32, -1, torch.randn(1, 8), bundle_id=BUNDLE)))
    with pytest.raises(InvalidRequest, match="bundle id"):
        wire.decode_request(wire.encode_request(StepRequest("s" * 32, 0, torch.randn(1, 8), bundle_id="")))
