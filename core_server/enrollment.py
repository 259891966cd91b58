"""The edges a core admits: their public keys and session quotas, from `core.allowed_edges`.

The file (a Helm Secret in a cluster) is YAML:

    edges:
      - name: alice-laptop            # shown in logs and metrics; never a secret
        public_key: x25519:...        # `veil edge identity` prints it (a PEM public key works too)
        max_sessions: 16              # concurrent sessions of this edge; default core.max_sessions
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import yaml

from veil.errors import ConfigError
from veil.identity import parse_public_key, raw_public

log = logging.getLogger("veil.core.enrollment")
_NAME = re.compile(r"^[A-Za-z0-9][-._A-Za-z0-9]{0,62}$")


@dataclasses.dataclass(frozen=True, slots=True)
class Edge:
    name: str
    public_key: bytes  # raw X25519
    max_sessions: int


def load_allowed_edges(path: Path, default_quota: int) -> dict[bytes, Edge]:
    """Enrolled edges by raw public key; a missing file admits no one (and says so)."""
    if not path.exists():
        log.warning("no allowed-edges file at %s: this core admits no edge", path)
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the allowed-edges file {path}") from exc
    entries = data.get("edges") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must hold a mapping with a list 'edges'")
    edges: dict[bytes, Edge] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: edges[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "public_key", "max_sessions"}:
            raise ConfigError(f"{where} must have name, public_key and optionally max_sessions")
        name, quota = entry.get("name"), entry.get("max_sessions", default_quota)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: name must be 1..63 letters, digits, '-', '.' or '_'")
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 1:
            raise ConfigError(f"{where}: max_sessions must be an integer >= 1")
        if not isinstance(entry.get("public_key"), str):
            raise ConfigError(f"{where}: public_key must be a string")
        key = raw_public(parse_public_key(entry["public_key"]))
        if key in edges or any(e.name == name for e in edges.values()):
            raise ConfigError(f"{where}: this edge's name or key is listed twice")
        edges[key] = Edge(name, key, quota)
    log.info("allowed edges loaded count=%d", len(edges))
    return edges


def allowed_edges_yaml(edges: list[tuple[str, str, int]]) -> str:
    """The file's text for (name, public key text, max_sessions) entries, as `veil up` writes it."""
    return yaml.safe_dump({"edges": [{"name": n, "public_key": k, "max_sessions": q} for n, k, q in edges]},
                          sort_keys=False)
