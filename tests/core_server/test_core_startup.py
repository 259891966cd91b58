"""A core that cannot start says so: one clear log line and a /readyz that reports the failure, whatever the cause."""

from __future__ import annotations

import logging
import time

import pytest
from litestar.testing import TestClient

from core_server import app as core_app
from veil.errors import BundleError, ConfigError
from veil.identity import load_or_create
from veil.settings import Settings


def _readyz_after_load(monkeypatch, tmp_path, failure: BaseException):
    def load(*args, **kwargs):
        raise failure

    monkeypatch.setattr(core_app.DecoderStack, "load", load)
    settings = Settings()
    settings.home = str(tmp_path)
    load_or_create(settings.core_identity_path())
    with TestClient(core_app.create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            response = client.get("/readyz")
            if response.json()["error"]["code"] != "not_ready":
                return client.get("/healthz"), response
            time.sleep(0.02)
    raise AssertionError("the core stayed 'still loading'")


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("CUDA driver mismatch"), KeyError("layers.0"),
                                     BundleError("core bundle lacks tensor x")], ids=type)
def test_any_start_up_failure_is_reported(monkeypatch, tmp_path, caplog, failure: BaseException) -> None:
    with caplog.at_level(logging.ERROR, logger="veil.core"):
        health, ready = _readyz_after_load(monkeypatch, tmp_path, failure)
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "load_failed"
    assert "failed to start" in ready.json()["error"]["message"]
    assert any("core failed to start" in r.getMessage() for r in caplog.records)


def test_a_core_without_an_identity_key_refuses_to_start(tmp_path) -> None:
    settings = Settings()
    settings.home = str(tmp_path)
    with pytest.raises(ConfigError, match="veil core keygen"):
        core_app.create_app(settings)
