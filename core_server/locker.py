"""The locker: idle sessions' KV caches in Redis, sealed under a key only the session's edge gives.

A snapshot is `nonce || AES-256-GCM(header || k || v)` under the session's locker key, with the
session id and bundle id as associated data; its Redis key is an HMAC of the session id under
the same key, so Redis learns neither ids nor contents. The core holds the locker key only while
the session is live (it arrives inside the sealed channel) and never writes it anywhere.
Snapshots expire after `locker.ttl_seconds`; when Redis evicts one (maxmemory), resuming that
session is a miss, and a miss costs the edge one re-prefill from its history, never the answer.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import math
import os
import threading
from pathlib import Path

import msgpack
import numpy as np
import redis
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core_server.metrics import CoreMetrics
from veil.errors import ConfigError
from veil.model.kv import Positions
from veil.settings import Settings

log = logging.getLogger("veil.core.locker")
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
_PREFIX = "veil:locker:"


def _array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (bfloat16, which NumPy lacks, as int16), strides kept."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


# Snapshots are copied with NumPy, not torch: they are taken and restored on the locker's threads, and a torch
# copy of a few thousand positions runs as an OpenMP parallel op, which gives that thread a team of its own for
# its lifetime. With more teams than CPUs, GNU OpenMP stops spinning between ops in every team, the runner's
# included, and its forwards ran 2-3x slower from the first spill on (see edge_proxy/compute.py).
def _raw(t: torch.Tensor) -> bytes:
    return _array(t.detach().to("cpu")).tobytes()  # C order, whatever the view's strides


def _aad(sid: str, bundle_id: str) -> bytes:
    return b"veil/1 locker|" + sid.encode() + b"|" + bundle_id.encode()


def seal_snapshot(state: Positions, sid: str, bundle_id: str, key: bytes) -> bytes:
    """The session's valid positions (a KV cache, or the input rows of an engine that keeps its own KV),
    sealed under the session's locker key."""
    parts = state.valid_parts()
    header = msgpack.packb({"v": 2, "bundle": bundle_id, "length": state.length,
                            "shapes": [list(p.shape) for p in parts], "dtype": _NAMES[parts[0].dtype]})
    plain = len(header).to_bytes(4, "big") + header + b"".join(_raw(p) for p in parts)
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, _aad(sid, bundle_id))


def open_snapshot(blob: bytes, sid: str, bundle_id: str, key: bytes, empty: Positions) -> Positions | None:
    """The snapshot restored into `empty` (a fresh state of the right kind), or None if it does not verify."""
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], _aad(sid, bundle_id))
    except (InvalidTag, ValueError):
        return None
    n_head = int.from_bytes(plain[:4], "big")
    header = msgpack.unpackb(plain[4 : 4 + n_head])
    n = header.get("length", -1)
    dtype = _DTYPES.get(header.get("dtype"))
    if not isinstance(n, int) or not 0 < n <= empty.limit:
        return None
    shapes = empty.part_shapes(n)
    if (header.get("bundle") != bundle_id or dtype is None or dtype != empty.parts[0].dtype
            or [tuple(s) for s in header.get("shapes", [])] != shapes):
        return None
    sizes = [math.prod(shape) * dtype.itemsize for shape in shapes]
    body = memoryview(plain)[4 + n_head :]
    if len(body) != sum(sizes):
        return None
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    seg = empty.begin(0, n)
    at = 0
    for dst, shape, size, axis in zip(empty.parts, shapes, sizes, empty.POSITION_AXES):
        part = torch.frombuffer(bytearray(body[at : at + size]), dtype=raw_dtype).view(dtype).view(shape)
        if dst.device.type == "cpu":
            np.copyto(_array(dst.narrow(axis, 0, n)), _array(part))
        else:
            dst.narrow(axis, 0, n).copy_(part)
        at += size
    empty.commit(seg)
    return empty


class Locker:
    """Puts (on a writer thread, so the runner never waits on Redis) and takes sealed snapshots."""

    def __init__(self, client: redis.Redis, metrics: CoreMetrics, *, ttl_seconds: int, max_bytes: int):
        self.client, self.metrics = client, metrics
        self.ttl_seconds, self.max_bytes = ttl_seconds, max_bytes
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="veil-locker")
        self._pending: dict[str, concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def locator(sid: str, key: bytes) -> str:
        return _PREFIX + hmac.new(key, b"locator|" + sid.encode(), hashlib.sha256).hexdigest()[:40]

    def put(self, sid: str, key: bytes, bundle_id: str, kv: Positions) -> None:
        """Queue a snapshot of `kv` (no longer used by anyone else) for writing."""
        where = self.locator(sid, key)
        fut = self._writer.submit(self._write, where, sid, key, bundle_id, kv)
        with self._lock:
            self._pending[where] = fut
        fut.add_done_callback(lambda _: self._forget(where, fut))

    def _forget(self, where: str, fut: concurrent.futures.Future[None]) -> None:
        with self._lock:
            if self._pending.get(where) is fut:
                del self._pending[where]

    def _write(self, where: str, sid: str, key: bytes, bundle_id: str, kv: Positions) -> None:
        blob = seal_snapshot(kv, sid, bundle_id, key)
        if len(blob) > self.max_bytes:
            self.metrics.locker_writes.labels(result="too_large").inc()
            log.info("session not lockered: snapshot over max_snapshot_bytes bytes=%d", len(blob))
            return
        try:
            self.client.set(where, blob, ex=self.ttl_seconds)
        except redis.RedisError as exc:
            self.metrics.locker_writes.labels(result="failed").inc()
            log.warning("locker write failed error=%s", type(exc).__name__)
            return
        self.metrics.locker_writes.labels(result="stored").inc()

    def flush(self, timeout: float = 30) -> None:
        """Wait for queued writes (at shutdown)."""
        with self._lock:
            pending = list(self._pending.values())
        concurrent.futures.wait(pending, timeout=timeout)

    def take(self, sid: str, key: bytes, bundle_id: str, empty: Positions) -> Positions | None:
        """The session's snapshot restored into `empty`, removed from Redis; None on a miss."""
        where = self.locator(sid, key)
        with self._lock:
            pending = self._pending.get(where)
        if pending is not None:
            concurrent.futures.wait([pending], timeout=30)  # this replica is still writing it
        try:
            blob = self.client.getdel(where)
        except redis.RedisError as exc:
            self.metrics.locker_reads.labels(result="failed").inc()
            log.warning("locker read failed error=%s", type(exc).__name__)
            return None
        if blob is None:
            self.metrics.locker_reads.labels(result="miss").inc()
            return None
        kv = open_snapshot(blob, sid, bundle_id, key, empty)  # type: ignore[arg-type]
        self.metrics.locker_reads.labels(result="hit" if kv is not None else "invalid").inc()
        if kv is None:
            log.warning("locker snapshot did not verify; the edge will re-prefill")
        return kv

    def discard(self, sid: str, key: bytes) -> None:
        try:
            self.client.delete(self.locator(sid, key))
        except redis.RedisError:
            pass  # the TTL removes it

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.client.close()


def locker_from_settings(settings: Settings, metrics: CoreMetrics) -> Locker | None:
    cfg = settings.locker
    if not cfg.redis_url:
        return None
    password = None
    if cfg.redis_password_file:
        try:
            password = Path(cfg.redis_password_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read locker.redis_password_file {cfg.redis_password_file}") from exc
    try:
        client = redis.Redis.from_url(cfg.redis_url, password=password, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:
        raise ConfigError("locker.redis_url is not a redis:// or rediss:// URL") from exc
    return Locker(client, metrics, ttl_seconds=cfg.ttl_seconds, max_bytes=cfg.max_snapshot_bytes)
