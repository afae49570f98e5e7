"""Shared fixtures: tiny real models saved to disk, so tests take the real from_pretrained path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path


def _save_tiny_qwen2(path: Path, *, tie_word_embeddings: bool) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    Qwen2ForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 causal LM (plain text model) saved with ``save_pretrained``."""
    return _save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tied_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_lm_dir`` but with ``lm_head`` tied to ``embed_tokens``."""
    return _save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)
