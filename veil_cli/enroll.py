"""Loopback enrollment: the keys and the allowed-edges entry that let a local edge talk to a local core.

`veil up`, the tests and the benchmarks wire both ends this way, so one command still starts Veil:
the core gets an identity key, the edge gets its own, the edge's key is enrolled at the core and
the edge pins the core's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from core_server.enrollment import allowed_edges_yaml
from veil.identity import fingerprint, load_or_create, public_text

LOCAL_EDGE = "local-edge"


def enroll_locally(core_key: Path, edge_key: Path, allowed_edges: Path, quota: int) -> dict[str, str]:
    """Make whatever is missing; -> the settings (as env vars) that point both ends at each other."""
    core = load_or_create(core_key).public_key()
    edge = public_text(load_or_create(edge_key).public_key())
    entries: list[tuple[str, str, int]] = []
    if allowed_edges.exists():
        data = yaml.safe_load(allowed_edges.read_text()) or {}
        entries = [(e["name"], e["public_key"], e.get("max_sessions", quota)) for e in data.get("edges", [])]
    if all(key != edge for _, key, _ in entries):
        names = {name for name, _, _ in entries}
        name = LOCAL_EDGE if LOCAL_EDGE not in names else f"{LOCAL_EDGE}-{len(entries)}"
        entries.append((name, edge, quota))
        allowed_edges.parent.mkdir(parents=True, exist_ok=True)
        allowed_edges.write_text(allowed_edges_yaml(entries))
    return {"VEIL_CORE_IDENTITY_KEY_FILE": str(core_key), "VEIL_EDGE_IDENTITY_KEY_FILE": str(edge_key),
            "VEIL_CORE_ALLOWED_EDGES": str(allowed_edges), "VEIL_EDGE_CORE_PUBLIC_KEY": fingerprint(core)}
