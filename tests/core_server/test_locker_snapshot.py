"""Locker snapshots: a session's KV cache sealed and restored exactly. They are copied with NumPy (a torch copy
on the locker's threads would start an OpenMP team there, see core_server/locker.py): a float32 and a bfloat16
cache, from strided views, into a pool slot."""

from __future__ import annotations

import pytest
import torch

from core_server.locker import open_snapshot, seal_snapshot
from veil.model.kv import KVPool, Session

KEY = b"k" * 32
LAYERS, KV_HEADS, HEAD_DIM, LENGTH = 4, 2, 64, 300  # 153,600 values a part: a torch copy of it runs in parallel


def _filled(dtype: torch.dtype) -> Session:
    session = Session(LAYERS, KV_HEADS, HEAD_DIM, dtype=dtype, device=torch.device("cpu"), limit=512)
    seg = session.begin(0, LENGTH)
    gen = torch.Generator().manual_seed(0)
    session.k[:, :, :LENGTH] = torch.randn(LAYERS, KV_HEADS, LENGTH, HEAD_DIM, generator=gen).to(dtype)
    session.v[:, :, :LENGTH] = torch.randn(LAYERS, KV_HEADS, LENGTH, HEAD_DIM, generator=gen).to(dtype)
    session.commit(seg)
    return session


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_snapshot_restores_the_cache_exactly_into_a_pool_slot(dtype: torch.dtype) -> None:
    session = _filled(dtype)
    blob = seal_snapshot(session, "s" * 32, "bundle", KEY)
    pool = KVPool(2, LAYERS, KV_HEADS, HEAD_DIM, limit=512, dtype=dtype, device=torch.device("cpu"))
    restored = open_snapshot(blob, "s" * 32, "bundle", KEY, pool.session())
    assert restored is not None and restored.length == LENGTH
    for got, want in zip(restored.valid_parts(), session.valid_parts()):
        assert torch.equal(got, want)
    assert open_snapshot(blob, "t" * 32, "bundle", KEY, pool.session()) is None  # another session's id: refused

