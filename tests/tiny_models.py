"""Tiny randomly initialised local HF model directories, for tests that need an architecture
the built-in aliases do not have (no download: weights from a fixed seed)."""

import shutil
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from spectrumkv.assets import model_dir

MISTRAL_WINDOW = 16


def mistral_dir(path: Path) -> Path:
    """A 3-layer Mistral-style model (`sliding_window` for every layer, no `layer_types`) with
    head_dim 80, saved with a tokenizer (SmolLM2's: tests feed token ids below 2048)."""
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=2048, hidden_size=160, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=80,
        sliding_window=MISTRAL_WINDOW, max_position_embeddings=256, initializer_range=0.2,
    )  # fmt: skip
    MistralForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir("smollm2-135m") / name, path / name)
    return path
