"""bitsandbytes models for the quantised-size tests, on the cpu and on a GPU (tests/gpu/)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers

if TYPE_CHECKING:
    from pathlib import Path

BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not BNB, reason="bitsandbytes is not installed")


#: The quantisations the size tests load: the three names and a config as a user writes it.
QUANTISATIONS = ["int8", "nf4", "fp4", "nf4-config"]


def asked(quantization: str) -> object:
    """What to pass as ``quantization=`` for one of :data:`QUANTISATIONS`."""
    if quantization == "nf4-config":  # as given: transformers' default skips, no double quant
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return quantization


def quantisation_state(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes keeps beside the weights: absmax, codes, int8 row scales."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        tensors: list[Any] = [getattr(weight, "SCB", None)]
        if state is not None:
            tensors += [state.absmax, state.code, getattr(state, "offset", None)]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def save_tiny_gpt2(path: Path) -> Path:
    """A 2-layer GPT-2 (``Conv1D`` projections) saved to ``path``."""
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def a_quantised_module(model: torch.nn.Module) -> str:
    """The name of the first module bitsandbytes replaced."""
    return next(
        name
        for name, module in model.named_modules()
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit")
    )
