"""Secrets at rest: AES-256-GCM under a key from a key file or a passphrase (scrypt).

A sealed blob is JSON: {"v", "kdf", "salt", "nonce", "ct"} with base64 fields, so it is
self-describing and any bit flip, truncation or wrong key fails authentication.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from veil.errors import BundleError
from veil.settings import Settings

log = logging.getLogger("veil.cloak")
KEY_BYTES = 32
# scrypt cost: ~64 MiB and well under a second; memory-hard against GPU guessing.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1


class KeySource:
    """Where the sealing key comes from: exactly one of a key file or a passphrase."""

    def __init__(self, *, key_file: Path | None = None, passphrase: str | None = None):
        if (key_file is None) == (not passphrase):
            raise BundleError("give exactly one of a key file or a passphrase to seal bundle secrets")
        self.key_file = key_file
        self.passphrase = passphrase

    def kdf_name(self) -> str:
        return "keyfile" if self.key_file is not None else "scrypt"

    def derive(self, salt: bytes) -> bytes:
        if self.key_file is not None:
            return read_key_file(self.key_file)
        assert self.passphrase
        kdf = Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        return kdf.derive(self.passphrase.encode())


def create_key_file(path: Path) -> None:
    """Write a fresh random key readable only by its owner; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise BundleError(f"cannot read key file {path}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise BundleError(f"key file {path} must hold {KEY_BYTES} bytes as hex")
    return key


def seal(plaintext: bytes, source: KeySource, aad: bytes = b"") -> bytes:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    ct = AESGCM(source.derive(salt)).encrypt(nonce, plaintext, aad)
    blob = {"v": 1, "kdf": source.kdf_name(), "salt": salt, "nonce": nonce, "ct": ct}
    return json.dumps({k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in blob.items()}).encode()


def unseal(blob: bytes, source: KeySource, aad: bytes = b"") -> bytes:
    try:
        fields = json.loads(blob)
        salt, nonce, ct = (base64.b64decode(fields[k]) for k in ("salt", "nonce", "ct"))
        kdf = fields["kdf"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError("sealed secret is malformed") from exc
    if kdf != source.kdf_name():
        raise BundleError(f"sealed secret needs a {kdf} key, not a {source.kdf_name()} key")
    try:
        return AESGCM(source.derive(salt)).decrypt(nonce, ct, aad)
    except InvalidTag as exc:
        raise BundleError("sealed secret failed authentication: wrong key or tampered file") from exc


def key_source(settings: Settings, create: bool = False) -> KeySource:
    """The bundle key: VEIL_BUNDLE_PASSPHRASE if set, else the key file (created on first use if asked)."""
    if settings.bundle.passphrase:
        return KeySource(passphrase=settings.bundle.passphrase)
    path = settings.key_file_path()
    if not path.exists():
        if not create:
            raise BundleError(f"no bundle key: set VEIL_BUNDLE_PASSPHRASE or create the key file {path}",
                              code="config_error")
        create_key_file(path)
        log.info("created bundle key file %s (mode 0600); keep it with the edge bundle", path)
    return KeySource(key_file=path)
