"""Console edges for the fast tests: real uvicorn edges in this process over an in-process tiny core."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Iterator

import pytest

from admin.plane import PolicyPlane, build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.edge_model import EdgeModel
from tests.conftest import REDIS_URL
from tests.edge_app import ThreadedEdge
from tests.inprocess_core import InProcessCore
from veil.settings import Settings

MODEL = "tiny-llama"
ADMIN_KEY = "sk-veil-adminboot-" + secrets.token_urlsafe(32)
PASSPHRASE = "console passphrase " + secrets.token_hex(6)


@dataclasses.dataclass
class ConsoleEdge:
    url: str
    settings: Settings
    plane: PolicyPlane
    server: ThreadedEdge


def console_settings(home: Path, *, auth: bool = True, redis: bool = False) -> Settings:
    settings = Settings()
    settings.home = str(home)
    settings.model.name = MODEL
    if auth:
        settings.auth.enabled, settings.auth.admin_key, settings.policy.passphrase = True, ADMIN_KEY, PASSPHRASE
    if redis:
        settings.redis.url = REDIS_URL
    return settings


def start_edge(tiny_bundles, key_file: Path, settings: Settings) -> ConsoleEdge:
    _, edge_dir, core_dir = tiny_bundles["llama"]
    plane = build_plane(settings)
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    server = ThreadedEdge(create_app(settings, model, core=InProcessCore(core_dir), plane=plane))
    return ConsoleEdge(server.url, settings, plane, server)


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file: Path, tmp_path_factory) -> Iterator[ConsoleEdge]:
    """Auth on, an encrypted store and audit log, sessions in memory."""
    one = start_edge(tiny_bundles, key_file, console_settings(tmp_path_factory.mktemp("console")))
    yield one
    one.server.stop()


@pytest.fixture(scope="module")
def replicas(tiny_bundles, key_file: Path, tmp_path_factory, rdb) -> Iterator[list[ConsoleEdge]]:
    """Two edges sharing one policy store, audit log and Redis (so their console sessions too)."""
    settings = console_settings(tmp_path_factory.mktemp("console-redis"), redis=True)
    both = [start_edge(tiny_bundles, key_file, settings) for _ in range(2)]
    yield both
    for one in both:
        one.server.stop()


@pytest.fixture(scope="module")
def open_edge(tiny_bundles, key_file: Path, tmp_path_factory) -> Iterator[ConsoleEdge]:
    """Auth off: one local user on loopback."""
    one = start_edge(tiny_bundles, key_file, console_settings(tmp_path_factory.mktemp("console-open"), auth=False))
    yield one
    one.server.stop()
