"""Keys from the policy passphrase, shared by the policy store and the audit log.

scrypt turns the passphrase and a salt into a master key (once per salt: it is memory-hard on purpose);
HKDF-SHA256 then gives one independent key per purpose, so no key serves two jobs.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

# scrypt cost: ~64 MiB per derivation, memory-hard against GPU guessing.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1
# n accepted on open: the low end exists for tests, the high end stops a hostile header exhausting memory.
MIN_SCRYPT_N, MAX_SCRYPT_N = 2**10, 2**20


def master_key(passphrase: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def subkey(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def valid_n(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and n & (n - 1) == 0
