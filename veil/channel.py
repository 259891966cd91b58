"""The sealed edge<->core channel: one mutually authenticated key exchange per session, then AEAD frames.

Handshake (one round trip, `POST /v1/sessions`):
  hello  edge -> core: HPKE (RFC 9180, base mode; DHKEM(X25519) or MLKEM768-X25519, HKDF-SHA256,
         AES-256-GCM) sealed to the pinned core key, holding the session id, the bundle id, the edge's
         static and ephemeral X25519 public keys, a fresh 32-byte secret `k`, a timestamp and a MAC
         keyed by X25519(edge static, core static) -- the proof that the sender holds an enrolled key
         (what HPKE's auth mode does, which `cryptography`'s one-shot HPKE does not expose).
  reply  core -> edge: the core's ephemeral X25519 public key and a confirmation MAC.
Both ends then derive per-direction AES-256-GCM keys with HKDF-SHA256 over k || ss || ee (ss the
static-static, ee the ephemeral-ephemeral X25519 output), salted with the transcript hash. The
confirmation proves the core holds the pinned private key: only it can open the hello (k) and
compute ss. Forward secrecy: the frame keys need ee, whose private halves live only in memory for
the handshake, so a later theft of the core's and the edge's static keys opens the hellos (session
ids, edge identities, k) but no frame. With the hybrid KEM, k also survives a future quantum
computer that breaks X25519.

Frames: `u64 big-endian seq || AES-256-GCM(ciphertext || tag)`, nonce = seq, associated data =
protocol | direction | session | operation | bundle id | seq. Each direction has its own key and
its own counter; the receiver accepts exactly the next seq, so a replayed, reordered, truncated,
tampered or misdirected frame fails before anything acts on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import struct
import time
from typing import Collection, Sequence

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import (
    AuthenticationFailed,
    CoreIdentityMismatch,
    CoreProtocolError,
    FrameOutOfOrder,
    FrameRejected,
    InvalidRequest,
)
from veil.identity import CoreIdentity, raw_public

PROTOCOL = b"veil/1"
HELLO_WINDOW_SECONDS = 120.0  # a hello older (or newer) than this is refused: bounds what a replay cache holds
KEM_X25519, KEM_HYBRID = 1, 2  # first byte of a hello body
_SUITES = {
    KEM_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    KEM_HYBRID: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_HELLO_INFO = PROTOCOL + b" hello"
EDGE_TO_CORE, CORE_TO_EDGE = b"e2c", b"c2e"
_SEQ = struct.Struct(">Q")
_TAG = 16
_MAX_HELLO = 4096


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=salt, info=PROTOCOL + b" " + info).derive(ikm)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _fields(sid: str, bundle: str, edge: bytes, eph: bytes, k: bytes, ts: float, resume: bool, kem: int) -> bytes:
    return msgpack.packb([1, sid, bundle, edge, eph, k, ts, resume, kem], use_bin_type=True)


def _auth_key(ss: bytes, k: bytes) -> bytes:
    return _hkdf(ss + k, b"", b"edge auth", 32)


def _session_keys(k: bytes, ss: bytes, ee: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes]:
    """(edge->core key, core->edge key, confirmation key)."""
    okm = _hkdf(k + ss + ee, transcript, b"session keys", 96)
    return okm[:32], okm[32:64], okm[64:]


def _transcript(fields: bytes, core_eph: bytes) -> bytes:
    return hashlib.sha256(PROTOCOL + fields + core_eph).digest()


class Channel:
    """One session's sealed frames; `send` and `recv` are the two directions as this end sees them."""

    def __init__(self, sid: str, bundle_id: str, send_key: bytes, recv_key: bytes, send_dir: bytes, recv_dir: bytes,
                 *, answers: bool = False):
        self.sid, self.bundle_id = sid, bundle_id
        self.answers = answers  # the core only answers frames: its seqs are the requests', never its own count
        self._send, self._recv = AESGCM(send_key), AESGCM(recv_key)
        self._send_dir, self._recv_dir = send_dir, recv_dir
        self.sent = 0  # next seq this end seals
        self.received = 0  # next seq this end accepts

    def _aad(self, direction: bytes, op: str, seq: int) -> bytes:
        return b"|".join([PROTOCOL, direction, self.sid.encode(), op.encode(), self.bundle_id.encode(),
                          _SEQ.pack(seq)])

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return b"\0\0\0\0" + _SEQ.pack(seq)

    def seal(self, op: str, plaintext: bytes, seq: int | None = None) -> bytes:
        """The next frame (or the answer to frame `seq`, on the side that answers)."""
        if seq is None:
            assert not self.answers, "an answering channel seals with the seq of the frame it answers"
            seq, self.sent = self.sent, self.sent + 1
        return _SEQ.pack(seq) + self._send.encrypt(self._nonce(seq), plaintext, self._aad(self._send_dir, op, seq))

    @staticmethod
    def seq_of(frame: bytes) -> int:
        if len(frame) < _SEQ.size + _TAG:
            raise FrameRejected()
        return _SEQ.unpack_from(frame)[0]

    def peek(self, op: str, frame: bytes) -> tuple[int, bytes]:
        """(seq, plaintext) of an authentic frame, without accepting it: the caller calls `accept(seq)`."""
        seq = self.seq_of(frame)
        try:
            plain = self._recv.decrypt(self._nonce(seq), memoryview(frame)[_SEQ.size:],
                                       self._aad(self._recv_dir, op, seq))
        except InvalidTag:
            raise FrameRejected() from None
        return seq, plain

    def accept(self, seq: int, final: bool = False) -> None:
        """Take frame `seq`: exactly the next one, or, for the `final` frame that ends the channel (a close), any
        later one. A sender that gave up on a frame in flight (its client went away mid-step) cannot know if it
        arrived; its close must still end the session, and skipping ahead replays nothing: the close is
        authentic, and every earlier seq is refused from then on."""
        if seq != self.received and not (final and seq > self.received):
            raise FrameOutOfOrder(f"frame {seq} is not the next one ({self.received}): replayed or reordered")
        self.received = seq + 1

    def open(self, op: str, frame: bytes, seq: int | None = None) -> bytes:
        """Plaintext of the next frame (or of the answer to frame `seq`, which must carry that seq)."""
        got, plain = self.peek(op, frame)
        if seq is None:
            self.accept(got)
        elif got != seq:
            raise FrameOutOfOrder(f"the answer carries frame {got}, not {seq}")
        return plain


# ---- the edge's side -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoreKeys:
    """The core's public keys as the edge trusts them (x25519 pinned; ML-KEM as the core serves it)."""

    x_key: x25519.X25519PublicKey
    pq_key: mlkem.MLKEM768PublicKey | None = None


class EdgeHello:
    """One handshake from the edge: `body` goes to the core, `finish(reply)` yields the channel."""

    def __init__(self, edge: x25519.X25519PrivateKey, core: CoreKeys, sid: str, bundle_id: str, *,
                 resume: bool = False, post_quantum: bool = False, now: float | None = None):
        self.sid, self.bundle_id = sid, bundle_id
        kem = KEM_HYBRID if post_quantum else KEM_X25519
        recipient: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey = core.x_key
        if kem == KEM_HYBRID:
            if core.pq_key is None:
                raise CoreProtocolError("the core serves no ML-KEM key for the post-quantum handshake")
            recipient = hpke.MLKEM768X25519PublicKey(core.pq_key, core.x_key)
        self._eph = x25519.X25519PrivateKey.generate()
        self._k = secrets.token_bytes(32)
        self._ss = edge.exchange(core.x_key)
        ts = time.time() if now is None else now
        self._fields = _fields(sid, bundle_id, raw_public(edge.public_key()), raw_public(self._eph.public_key()),
                               self._k, ts, resume, kem)
        plain = msgpack.packb([self._fields, _mac(_auth_key(self._ss, self._k), self._fields)], use_bin_type=True)
        self.body = bytes([kem]) + key_id(core.x_key) + _SUITES[kem].encrypt(plain, recipient, info=_HELLO_INFO)

    def finish(self, reply: bytes) -> Channel:
        """Check the core's confirmation; a core without the pinned key cannot produce it."""
        try:
            core_eph_raw, confirm = msgpack.unpackb(reply, raw=False)
            core_eph = x25519.X25519PublicKey.from_public_bytes(core_eph_raw)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CoreIdentityMismatch("the core's handshake reply is malformed: it did not prove the pinned key") from exc
        ee = self._eph.exchange(core_eph)
        e2c, c2e, confirm_key = _session_keys(self._k, self._ss, ee, _transcript(self._fields, core_eph_raw))
        if not isinstance(confirm, bytes) or not hmac.compare_digest(confirm, _mac(confirm_key, b"core confirms")):
            raise CoreIdentityMismatch("the core could not prove it holds the pinned identity key")
        del self._eph, self._k, self._ss
        return Channel(self.sid, self.bundle_id, e2c, c2e, EDGE_TO_CORE, CORE_TO_EDGE)


# ---- the core's side -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello:
    """An opened, authenticated hello; `accept` answers it."""

    sid: str
    bundle_id: str
    edge_public: bytes  # raw X25519 key of the (enrolled) edge that sent it
    resume: bool
    kem: int
    timestamp: float
    digest: bytes  # for the replay cache
    _eph: x25519.X25519PublicKey
    _k: bytes
    _ss: bytes
    _fields: bytes

    def accept(self) -> tuple[bytes, Channel]:
        """(reply body, the core's channel for this session)."""
        eph = x25519.X25519PrivateKey.generate()
        eph_raw = raw_public(eph.public_key())
        e2c, c2e, confirm_key = _session_keys(self._k, self._ss, eph.exchange(self._eph),
                                              _transcript(self._fields, eph_raw))
        reply = msgpack.packb([eph_raw, _mac(confirm_key, b"core confirms")], use_bin_type=True)
        return reply, Channel(self.sid, self.bundle_id, c2e, e2c, CORE_TO_EDGE, EDGE_TO_CORE, answers=True)


def _refused() -> AuthenticationFailed:
    # one answer for every way a hello can fail: a prober learns nothing about which edges are enrolled
    return AuthenticationFailed("the core admits only enrolled edges", code="edge_not_admitted")


def key_id(key: x25519.X25519PublicKey) -> bytes:
    """The 8 bytes after the KEM byte: which of a core's keys (during a rotation) the hello is sealed to."""
    return hashlib.sha256(raw_public(key)).digest()[:8]


def open_hello(body: bytes, cores: Sequence[CoreIdentity], enrolled: Collection[bytes],
               now: float | None = None) -> Hello:
    """Decrypt and authenticate a hello sealed to one of `cores` (the current key, and the previous one
    during a rotation), or raise 401 without saying why."""
    if not 10 <= len(body) <= _MAX_HELLO or body[0] not in _SUITES:
        raise _refused()
    kem = body[0]
    core = next((c for c in cores if c.key_id == body[1:9]), None)
    if core is None:
        raise _refused()
    recipient = core.x_key if kem == KEM_X25519 else hpke.MLKEM768X25519PrivateKey(core.pq_key, core.x_key)
    try:
        plain = _SUITES[kem].decrypt(body[9:], recipient, info=_HELLO_INFO)
        fields, mac = msgpack.unpackb(plain, raw=False)
        version, sid, bundle, edge, eph, k, ts, resume, kem_inside = msgpack.unpackb(fields, raw=False)
        edge_key = x25519.X25519PublicKey.from_public_bytes(edge)
        eph_key = x25519.X25519PublicKey.from_public_bytes(eph)
    except Exception:  # any failure to open or parse is the same refusal
        raise _refused() from None
    if (version != 1 or kem_inside != kem or not isinstance(sid, str) or not isinstance(bundle, str)
            or not isinstance(k, bytes) or len(k) != 32 or not isinstance(ts, float | int)
            or not isinstance(resume, bool) or not isinstance(mac, bytes) or edge not in enrolled):
        raise _refused()
    ss = core.x_key.exchange(edge_key)
    if not hmac.compare_digest(mac, _mac(_auth_key(ss, k), fields)):
        raise _refused()
    now = time.time() if now is None else now
    if abs(now - ts) > HELLO_WINDOW_SECONDS:
        raise AuthenticationFailed("the hello is outside the core's time window; check both clocks",
                                   code="hello_expired")
    if not 8 <= len(sid) <= 128 or not 1 <= len(bundle) <= 128:
        raise InvalidRequest("a hello needs a session id of 8..128 and a bundle id of 1..128 characters")
    return Hello(sid, bundle, edge, resume, kem, float(ts), hashlib.sha256(fields).digest(), eph_key, k, ss, fields)
