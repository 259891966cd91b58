"""The KV memory plan: sessions capped to the budget, a core that cannot hold one session refuses to start."""

import logging

import pytest
import torch

from core_server.memory import free_bytes, plan_kv
from veil.errors import ConfigError

DIMS = dict(layers=30, kv_heads=3, head_dim=64, dtype=torch.float32, max_tokens=2048)  # SmolLM2 at 2048 tokens
SESSION = 30 * 2 * 3 * 64 * 2048 * 4


def test_everything_fits() -> None:
    assert plan_kv(**DIMS, max_sessions=8, budget_bytes=8 * SESSION) == 8


def test_sessions_are_capped_and_the_log_says_so(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="veil.core.memory"):
        sessions = plan_kv(**DIMS, max_sessions=64, budget_bytes=5 * SESSION + 1)
    assert sessions == 5
    assert any("admitting 5" in r.getMessage() for r in caplog.records)


def test_not_even_one_session_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="lower core.max_tokens_per_session"):
        plan_kv(**DIMS, max_sessions=1, budget_bytes=SESSION - 1)
    half = plan_kv(**{**DIMS, "dtype": torch.bfloat16}, max_sessions=2, budget_bytes=SESSION)
    assert half == 2  # half the bytes per element


def test_free_memory_is_read_on_the_cpu() -> None:
    assert free_bytes(torch.device("cpu")) > 0
