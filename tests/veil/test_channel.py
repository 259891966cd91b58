"""The sealed channel: handshake, frames, and which key's later theft opens which recorded traffic."""

from __future__ import annotations

import time

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core_server.replays import ReplayGuard
from veil import channel as ch
from veil.channel import CoreKeys, EdgeHello, open_hello
from veil.errors import AuthenticationFailed, CoreIdentityMismatch, FrameOutOfOrder, FrameRejected
from veil.identity import CoreIdentity, raw_public

SID, BUNDLE = "5e55" * 8, "b" * 32


def _pair(post_quantum: bool = False):
    core = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
    edge = x25519.X25519PrivateKey.generate()
    hello = EdgeHello(edge, CoreKeys(core.public, core.pq_key.public_key()), SID, BUNDLE, post_quantum=post_quantum)
    return core, edge, hello


@pytest.mark.parametrize("post_quantum", [False, True], ids=["x25519", "mlkem768-x25519"])
def test_a_handshake_gives_both_ends_matching_keys(post_quantum: bool) -> None:
    core, edge, hello = _pair(post_quantum)
    opened = open_hello(hello.body, [core], {raw_public(edge.public_key())})
    assert (opened.sid, opened.bundle_id, opened.kem) == (SID, BUNDLE, 2 if post_quantum else 1)
    reply, core_side = opened.accept()
    edge_side = hello.finish(reply)
    frame = edge_side.seal("step", b"rows")
    assert core_side.open("step", frame) == b"rows"
    assert edge_side.open("step", core_side.seal("step", b"result", seq=0), seq=0) == b"result"
    with pytest.raises(AssertionError):
        core_side.seal("step", b"x")  # the core only answers: a count of its own would reuse a nonce


def test_frames_bind_direction_op_and_order() -> None:
    core, edge, hello = _pair()
    reply, core_side = open_hello(hello.body, [core], {raw_public(edge.public_key())}).accept()
    edge_side = hello.finish(reply)
    f0, f1 = edge_side.seal("step", b"a"), edge_side.seal("step", b"b")
    with pytest.raises(FrameOutOfOrder):
        core_side.open("step", f1)  # reordered: refused, nothing accepted
    with pytest.raises(FrameRejected):
        core_side.open("close", f0)  # another operation
    with pytest.raises(FrameRejected):
        edge_side.open("step", f0, seq=0)  # sent back the other way
    assert core_side.open("step", f0) == b"a" and core_side.open("step", f1) == b"b"
    with pytest.raises(FrameOutOfOrder):
        core_side.open("step", f0)  # replayed


def test_a_close_may_skip_frames_that_never_arrived_and_nothing_else_may() -> None:
    core, edge, hello = _pair()
    reply, core_side = open_hello(hello.body, [core], {raw_public(edge.public_key())}).accept()
    edge_side = hello.finish(reply)
    assert core_side.open("step", edge_side.seal("step", b"a")) == b"a"
    lost, later = edge_side.seal("step", b"lost in flight"), edge_side.seal("step", b"b")
    with pytest.raises(FrameOutOfOrder):
        core_side.accept(core_side.peek("step", later)[0])  # a step may not skip one
    close = edge_side.seal("close", b"")
    seq, _ = core_side.peek("close", close)
    core_side.accept(seq, final=True)  # the close ends the channel although frame 1 never came
    for frame, op in ((lost, "step"), (later, "step"), (close, "close")):
        with pytest.raises(FrameOutOfOrder):  # nothing before the close, nor the close again
            core_side.accept(core_side.peek(op, frame)[0], final=op == "close")


def test_only_an_enrolled_edge_with_a_fresh_hello_gets_in() -> None:
    core, edge, hello = _pair()
    enrolled = {raw_public(edge.public_key())}
    stranger = EdgeHello(x25519.X25519PrivateKey.generate(), CoreKeys(core.public), SID, BUNDLE)
    for body in (stranger.body, hello.body[:-1], hello.body[:9] + bytes([hello.body[9] ^ 1]) + hello.body[10:], b""):
        with pytest.raises(AuthenticationFailed) as err:
            open_hello(body, [core], enrolled)
        assert err.value.code == "edge_not_admitted"
    other_core = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
    with pytest.raises(AuthenticationFailed):
        open_hello(hello.body, [other_core], enrolled)  # sealed to another key
    stale = EdgeHello(edge, CoreKeys(core.public), SID, BUNDLE, now=time.time() - 600)
    with pytest.raises(AuthenticationFailed, match="time window"):
        open_hello(stale.body, [core], enrolled)
    guard = ReplayGuard()
    guard.check(open_hello(hello.body, [core], enrolled).digest)
    with pytest.raises(AuthenticationFailed, match="seen before"):
        guard.check(open_hello(hello.body, [core], enrolled).digest)


def test_during_a_rotation_the_core_opens_hellos_to_either_key() -> None:
    old, edge, hello = _pair()
    new = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
    assert open_hello(hello.body, [new, old], {raw_public(edge.public_key())}).sid == SID


def test_a_core_without_the_pinned_private_key_cannot_confirm() -> None:
    core, edge, hello = _pair()
    impostor = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
    fake_reply = msgpack.packb([raw_public(impostor.public), b"\0" * 32])
    with pytest.raises(CoreIdentityMismatch):
        hello.finish(fake_reply)


def _recorded_session(post_quantum: bool = False):
    """Everything a recorder keeps of one session, plus the edge's ephemeral key (for the control)."""
    core, edge, hello = _pair(post_quantum)
    eph = hello._eph
    opened = open_hello(hello.body, [core], {raw_public(edge.public_key())})
    reply, core_side = opened.accept()
    edge_side = hello.finish(reply)
    frame = edge_side.seal("step", b"the rotated rows of a prompt")
    core_side.open("step", frame)
    return core, edge, eph, hello.body, reply, frame


def _try_open(k: bytes, ss: bytes, ee: bytes, fields: bytes, reply: bytes, frame: bytes) -> bytes:
    core_eph = msgpack.unpackb(reply)[0]
    e2c, _, _ = ch._session_keys(k, ss, ee, ch._transcript(fields, core_eph))
    aad = b"|".join([ch.PROTOCOL, ch.EDGE_TO_CORE, SID.encode(), b"step", BUNDLE.encode(), frame[:8]])
    return AESGCM(e2c).decrypt(b"\0\0\0\0" + frame[:8], frame[8:], aad)


def test_stolen_static_keys_open_the_hello_but_no_recorded_frame() -> None:
    """Forward secrecy: the frame keys need the ephemeral-ephemeral exchange, gone after the handshake."""
    core, edge, eph, hello_body, reply, frame = _recorded_session()
    # the thief holds both static private keys: it opens the hello and recomputes everything static
    plain = ch._SUITES[hello_body[0]].decrypt(hello_body[9:], core.x_key, info=ch._HELLO_INFO)
    fields, _ = msgpack.unpackb(plain)
    _, _, _, _, edge_eph, k, _, _, _ = msgpack.unpackb(fields)
    ss = edge.exchange(core.public)
    core_eph = x25519.X25519PublicKey.from_public_bytes(msgpack.unpackb(reply)[0])
    for guess in (core.x_key.exchange(x25519.X25519PublicKey.from_public_bytes(edge_eph)),  # es
                  edge.exchange(core_eph), ss, b"\0" * 32):  # se, ss again, nothing
        with pytest.raises(InvalidTag):
            _try_open(k, ss, guess, fields, reply, frame)
    # control: the one missing piece, the ephemeral exchange, opens it (so the test above can fail)
    assert _try_open(k, ss, eph.exchange(core_eph), fields, reply, frame) == b"the rotated rows of a prompt"
