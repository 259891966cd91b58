"""The core's KV memory plan, made once at start: every session at its token limit must fit."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from veil.errors import ConfigError

log = logging.getLogger("veil.core.memory")
AUTO_SHARE = 0.9  # of the device's free memory, when no budget is configured


def free_bytes(device: torch.device) -> int:
    """Free memory on the device now (after the weights are loaded)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ConfigError("cannot tell how much memory is free: set core.kv_budget_bytes")


def plan_kv(*, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int, max_sessions: int,
            budget_bytes: int) -> int:
    """The sessions the core will admit: max_sessions, or as many as fit the budget at max_tokens each
    (said in the log); refuse to start when not even one fits."""
    session = layers * 2 * kv_heads * head_dim * max_tokens * torch.empty((), dtype=dtype).element_size()
    fit = budget_bytes // session
    if fit < 1:
        raise ConfigError(f"one session of {max_tokens} tokens needs {session / 2**20:.0f} MiB of KV cache but the "
                          f"budget is {budget_bytes / 2**20:.0f} MiB: lower core.max_tokens_per_session")
    if fit < max_sessions:
        log.warning("KV budget holds %d of max_sessions=%d sessions at %d tokens (%.0f MiB each, budget %.0f MiB); "
                    "admitting %d", fit, max_sessions, max_tokens, session / 2**20, budget_bytes / 2**20, fit)
    return min(fit, max_sessions)
