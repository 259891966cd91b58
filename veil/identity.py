"""Static identity keys of cores and edges: X25519 key pairs in PEM files, their text forms and fingerprints.

A core's identity is one X25519 key (PKCS#8 PEM, the form the Helm chart's Secret holds). Its
ML-KEM-768 key for the post-quantum hybrid KEM is derived from it with HKDF, so one file is
the whole identity and every replica that mounts it has the same keys. An edge's identity is
its own X25519 key, made on first start and kept 0600 in its home.

Text forms: a public key is `x25519:<base64url of the 32 raw bytes>` (or a PEM
SubjectPublicKeyInfo); a fingerprint is `SHA256:<base64url of sha256(raw public key)>`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import ConfigError

PUBLIC_PREFIX = "x25519:"
FINGERPRINT_PREFIX = "SHA256:"
_MLKEM_SEED_INFO = b"veil/1 core mlkem768 seed"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ConfigError("a key is not valid base64url") from exc


def raw_public(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: x25519.X25519PublicKey) -> str:
    return PUBLIC_PREFIX + b64(raw_public(key))


def fingerprint(key: x25519.X25519PublicKey) -> str:
    return FINGERPRINT_PREFIX + b64(hashlib.sha256(raw_public(key)).digest())


def parse_public_key(text: str) -> x25519.X25519PublicKey:
    """`x25519:<base64url>` or a PEM SubjectPublicKeyInfo holding an X25519 key."""
    text = text.strip()
    if text.startswith(PUBLIC_PREFIX):
        raw = unb64(text[len(PUBLIC_PREFIX):])
        if len(raw) != 32:
            raise ConfigError("an x25519: public key must hold 32 bytes")
        return x25519.X25519PublicKey.from_public_bytes(raw)
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ConfigError("a public key PEM could not be read") from exc
        if not isinstance(key, x25519.X25519PublicKey):
            raise ConfigError("a public key PEM must hold an X25519 key")
        return key
    raise ConfigError("a public key must be 'x25519:<base64url>' or a PEM public key")


def private_pem(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path) -> x25519.X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the identity key {path} (a PEM PKCS#8 X25519 private key)") from exc
    if not isinstance(key, x25519.X25519PrivateKey):
        raise ConfigError(f"the identity key {path} is not an X25519 key")
    return key


def write_private_key(path: Path, key: x25519.X25519PrivateKey) -> None:
    """Write atomically with mode 0600: the file never exists with looser permissions or half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create(path: Path) -> x25519.X25519PrivateKey:
    """The key at `path`, made (0600) if there is none yet."""
    if Path(path).exists():
        return load_private_key(path)
    key = x25519.X25519PrivateKey.generate()
    write_private_key(path, key)
    return key


@dataclasses.dataclass(frozen=True)
class CoreIdentity:
    """A core's keys: X25519 for the handshake and the classic KEM, ML-KEM-768 derived from it for the hybrid."""

    x_key: x25519.X25519PrivateKey
    pq_key: mlkem.MLKEM768PrivateKey

    @classmethod
    def from_key(cls, key: x25519.X25519PrivateKey) -> CoreIdentity:
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        seed = HKDF(hashes.SHA256(), 64, salt=None, info=_MLKEM_SEED_INFO).derive(raw)
        return cls(key, mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))

    @property
    def public(self) -> x25519.X25519PublicKey:
        return self.x_key.public_key()

    @property
    def key_id(self) -> bytes:
        """What a hello names its recipient by (sha256 of the public key, 8 bytes)."""
        return hashlib.sha256(raw_public(self.public)).digest()[:8]

    def info(self) -> dict[str, str]:
        """The public half, as /v1/info serves it."""
        return {"public_key": public_text(self.public), "fingerprint": fingerprint(self.public),
                "mlkem768_public_key": b64(self.pq_key.public_key().public_bytes_raw())}


@dataclasses.dataclass(frozen=True)
class CorePin:
    """What an edge trusts: one or more core keys, by fingerprint or whole public key (several during a
    key rotation, comma-separated)."""

    fingerprints: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> CorePin:
        pins = []
        for part in (p.strip() for p in (text.split(",") if "BEGIN" not in text else [text])):
            if not part:
                continue
            if part.startswith(FINGERPRINT_PREFIX):
                if len(unb64(part[len(FINGERPRINT_PREFIX):])) != 32:
                    raise ConfigError("a core fingerprint must be SHA256:<base64url of 32 bytes>")
                pins.append(part)
            else:
                pins.append(fingerprint(parse_public_key(part)))
        if not pins:
            raise ConfigError("edge.core_public_key names no key")
        return cls(tuple(pins))

    def matches(self, key: x25519.X25519PublicKey) -> bool:
        return fingerprint(key) in self.fingerprints

    def __str__(self) -> str:
        return ", ".join(self.fingerprints)
