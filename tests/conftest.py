"""Shared fixtures: a clean environment, the bundled model and its bundles, tiny models, real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
for _name in [k for k in os.environ if k.startswith("VEIL_")]:
    del os.environ[_name]

from cloaking.checkpoint import Checkpoint, bundled_model_path, load_checkpoint  # noqa: E402
from cloaking.cloak import cloak  # noqa: E402
from cloaking.secretbox import KeySource, create_key_file  # noqa: E402
from veil_cli.processes import VeilPair  # noqa: E402

SMOL_NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
# The core's vllm engine runs in its own venv (make core-vllm); both engines are tested in CI.
VLLM_PYTHON = REPO / ".venv-core-vllm" / "bin" / "python"
ENGINES = ("native", "vllm")


def engine_env(engine: str) -> dict[str, str]:
    """Core settings that select `engine`; the vllm engine's absence is a failure, never a skip."""
    if engine == "native":
        return {}
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"the vllm engine's tests need its venv at {VLLM_PYTHON}: run `make core-vllm`")
    # vLLM's KV cache is a prefix cache here: a small one holds the tests' sessions
    return {"VEIL_CORE_ENGINE": "vllm", "VEIL_CORE_PYTHON": str(VLLM_PYTHON),
            "VEIL_CORE_KV_BUDGET_BYTES": str(384 << 20)}


@pytest.fixture(scope="session")
def smol() -> Checkpoint:
    """The real SmolLM2-135M-Instruct, loaded once (also the unsplit reference)."""
    return load_checkpoint(bundled_model_path())


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "bundle.key"
    create_key_file(path)
    return path


@pytest.fixture(scope="session")
def smol_bundles(smol: Checkpoint, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smol-bundles")
    edge, core = root / "edge", root / "core"
    cloak(smol, edge, core, KeySource(key_file=key_file), SMOL_NAME, progress=False)
    return edge, core


def _smol_pair(engine: str, smol_bundles: tuple[Path, Path], key_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> VeilPair:
    # the native core logs at DEBUG, so that the log-privacy tests search every line a core can write (the
    # per-step lines included)
    debug = {"VEIL_LOG_LEVEL": "debug"} if engine == "native" else {}
    return VeilPair(tmp_path_factory.mktemp(f"smol-servers-{engine}"), *smol_bundles, key_file, SMOL_NAME,
                    core_env={"VEIL_CORE_MAX_TOKENS_PER_SESSION": "2048", "VEIL_CORE_SESSION_IDLE_SECONDS": "120",
                              **debug, **engine_env(engine)})


@pytest.fixture(scope="session")
def smol_servers(smol_bundles: tuple[Path, Path], key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """Core + edge for SmolLM2 on loopback; the core's per-session limit is 2048 to keep limit tests cheap."""
    pair = _smol_pair("native", smol_bundles, key_file, tmp_path_factory)
    yield pair
    pair.stop()


@pytest.fixture(scope="session")
def smol_servers_vllm(smol_bundles: tuple[Path, Path], key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same pair with the core on the vllm engine."""
    pair = _smol_pair("vllm", smol_bundles, key_file, tmp_path_factory)
    yield pair
    pair.stop()


@pytest.fixture(scope="session", params=ENGINES)
def smol_servers_by_engine(request: pytest.FixtureRequest) -> VeilPair:
    """SmolLM2's pair on each core engine in turn."""
    return request.getfixturevalue("smol_servers" if request.param == "native" else "smol_servers_vllm")


def reference_greedy(ckpt: Checkpoint, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy generation: the unsplit reference."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = ckpt.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=ckpt.tokenizer.pad_token_id or 0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def tiny_checkpoints(smol: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny HF folder per architecture, sharing SmolLM2's tokenizer and chat template."""
    from tests.tiny_models import ARCHITECTURES, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, smol.tokenizer, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints: dict[str, Path], key_file: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Checkpoint, Path, Path]]:
    root = tmp_path_factory.mktemp("tiny-bundles")
    out = {}
    for arch, folder in tiny_checkpoints.items():
        ckpt = load_checkpoint(folder)
        edge, core = root / arch / "edge", root / arch / "core"
        cloak(ckpt, edge, core, KeySource(key_file=key_file), f"tiny-{arch}", progress=False)
        out[arch] = (ckpt, edge, core)
    return out


REDIS_URL = "redis://127.0.0.1:6379/0"  # the Redis these machines run; scripts/ensure_redis.sh starts one


@pytest.fixture(scope="session")
def rdb() -> Iterator[redis.Redis]:
    """A real Redis; its absence is a failure, never a skip."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"these tests need a real Redis at {REDIS_URL} (run scripts/ensure_redis.sh): {exc!r}")
    yield client
    client.close()
