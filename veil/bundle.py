"""Bundle formats written by `veil cloak`: the core bundle (folded decoder blocks) and the
edge bundle (tokenizer, embedding, final norm, LM head and the sealed rotation Q).

This module needs only safetensors and json, so the core can read its bundle without
importing anything edge-side.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from veil.errors import BundleError

CORE_SPEC = "core.json"
CORE_WEIGHTS = "core.safetensors"
EDGE_SPEC = "edge.json"
EDGE_WEIGHTS = "edge.safetensors"
EDGE_SEALED_Q = "q.sealed"
EDGE_TOKENIZER = "tokenizer"
EDGE_LAYERS_SPEC = "edge_layers.json"  # the first k blocks, when the edge holds some (--edge-layers k)
EDGE_LAYERS_WEIGHTS = "edge_layers.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass(slots=True)
class CoreSpec:
    """Shape of the decoder stack the core runs; nothing here identifies tokens."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: list[int | None]  # per layer; None = full attention
    rope_attention_scaling: float
    max_positions: int
    bundle_id: str
    first_layer: int = 0  # index of this stack's first block in the original model
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "query heads must group over KV heads"
        assert len(self.sliding_windows) == self.num_layers


@dataclasses.dataclass(slots=True)
class EdgeSpec:
    """What the edge needs besides tensors: vocabulary, limits and the matching core bundle."""

    model_name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    tied_embeddings: bool
    eos_token_ids: list[int]
    max_positions: int
    bundle_id: str
    edge_layers: int = 0  # blocks the edge runs itself before the core
    format_version: int = FORMAT_VERSION


def write_spec(path: Path, spec: CoreSpec | EdgeSpec) -> None:
    path.write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def _read_spec(path: Path, cls: type) -> CoreSpec | EdgeSpec:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read bundle spec {path}") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path} has format version {data.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        return cls(**data)
    except (TypeError, AssertionError) as exc:
        raise BundleError(f"bundle spec {path} is malformed") from exc


def read_core_spec(bundle_dir: Path, name: str = CORE_SPEC) -> CoreSpec:
    return _read_spec(Path(bundle_dir) / name, CoreSpec)  # type: ignore[return-value]


def read_edge_spec(bundle_dir: Path) -> EdgeSpec:
    return _read_spec(Path(bundle_dir) / EDGE_SPEC, EdgeSpec)  # type: ignore[return-value]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"cannot read bundle tensors {path}") from exc


def bundle_exists(bundle_dir: Path, spec_name: str) -> bool:
    return (Path(bundle_dir) / spec_name).is_file()
