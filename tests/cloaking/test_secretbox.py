from pathlib import Path

import pytest

from cloaking.secretbox import KeySource, create_key_file, seal, unseal
from veil.errors import BundleError


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    key = tmp_path / "k"
    create_key_file(key)
    assert key.stat().st_mode & 0o777 == 0o600
    src = KeySource(key_file=key)
    blob = seal(b"secret matrix", src, aad=b"bundle-1")
    assert b"secret matrix" not in blob
    assert unseal(blob, src, aad=b"bundle-1") == b"secret matrix"
    with pytest.raises(FileExistsError):
        create_key_file(key)  # never overwrite a key


def test_passphrase_round_trip_and_wrong_passphrase(tmp_path: Path) -> None:
    blob = seal(b"q", KeySource(passphrase="correct horse"))
    assert unseal(blob, KeySource(passphrase="correct horse")) == b"q"
    with pytest.raises(BundleError, match="wrong key or tampered"):
        unseal(blob, KeySource(passphrase="wrong"))


def test_tampering_and_wrong_context_are_detected(tmp_path: Path) -> None:
    key = tmp_path / "k"
    create_key_file(key)
    src = KeySource(key_file=key)
    blob = bytearray(seal(b"payload" * 10, src, aad=b"a"))
    with pytest.raises(BundleError):
        unseal(bytes(blob), src, aad=b"b")  # bound to its bundle id
    i = blob.index(b'"ct": "') + 10
    blob[i] = ord("A") if blob[i] != ord("A") else ord("B")
    with pytest.raises(BundleError):
        unseal(bytes(blob), src, aad=b"a")
    with pytest.raises(BundleError, match="malformed"):
        unseal(b"{not json", src)


def test_exactly_one_key_source() -> None:
    with pytest.raises(BundleError):
        KeySource()
    with pytest.raises(BundleError):
        KeySource(key_file=Path("k"), passphrase="p")
