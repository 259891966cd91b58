"""Tiny random-initialised checkpoints of each supported architecture, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# head_dim 32: the smallest vLLM's CPU attention runs (the vllm engine is tested on these too)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)


def _configs() -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": lambda v: LlamaConfig(vocab_size=v, **COMMON),
        "qwen2": lambda v: Qwen2Config(vocab_size=v, **COMMON),  # q/k/v biases
        "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=64, **COMMON),  # per-head q/k norms, wide heads
        "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=16, **COMMON),  # window < prompt length
    }


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def build_tiny(arch: str, tokenizer: Any, folder: Path, seed: int = 0) -> Path:
    """Save a tiny `arch` model with `tokenizer` as a Hugging Face folder; norm gains are randomised
    so that folding them into the weights is really exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch](len(tokenizer))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
