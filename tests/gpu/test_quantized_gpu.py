"""bitsandbytes loads on a GPU: the plan's quantised weights against what bitsandbytes holds there.

Each case loads a saved model through ``load_safely(..., quantization=...)`` onto ``cuda:0`` and
compares the plan's weights with ``get_memory_footprint()`` plus the quantisation state that
bitsandbytes keeps beside the weights (absmax, codes, int8 row scales), within 2 %; for the
full-width model also with the bytes the caching allocator holds after the load. Then it generates
two tokens, so that the quantised kernels ran on the GPU. With ``OMNIFIX_GPU_OUT`` set, one JSON
line per case goes to ``quantised-gpu.jsonl`` there (benchmarks/results, docs/planning.md).
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tests.bnb_models import (
    QUANTISATIONS,
    a_quantised_module,
    asked,
    needs_bnb,
    quantisation_state,
    save_tiny_gpt2,
)

import omnifix
import omnifix.testing as ot
from omnifix import plan_placement

pytestmark = [pytest.mark.gpu, needs_bnb]


def _full_width(path: Path) -> Path:
    """Two Qwen2.5-3B layers at full width, with its 151,936-token tied embeddings."""
    config = transformers.Qwen2Config(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    with torch.device("cuda:0"):
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def _saved(family: str, path: Path) -> Path:
    if family == "gpt2":
        return save_tiny_gpt2(path)
    if family == "qwen2.5-3b-width":
        return _full_width(path)
    return ot.save_tiny_model(family, path)  # type: ignore[arg-type]


def _record(entry: dict[str, Any]) -> None:
    out = os.environ.get("OMNIFIX_GPU_OUT")
    if out:
        with (Path(out) / "quantised-gpu.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("quantization", QUANTISATIONS)
@pytest.mark.parametrize("family", ["qwen2", "qwen2-vl", "gpt2", "qwen2.5-3b-width"])
def test_quantised_weights_on_the_gpu_match_bitsandbytes(
    family: str, quantization: str, tmp_path: Path
) -> None:
    path = _saved(family, tmp_path / family)
    quantised_as = asked(quantization)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = omnifix.load_safely(
            path, device="cuda", dtype=torch.bfloat16, quantization=quantised_as
        )
    held = torch.cuda.memory_allocated(0) - before
    plan = plan_placement(
        path, budgets={0: "40GiB"}, dtype=torch.bfloat16, quantization=quantised_as
    )
    quantised = model.get_submodule(a_quantised_module(model))
    assert type(quantised).__module__.startswith("bitsandbytes")
    assert quantised.weight.device == torch.device("cuda:0")
    real = model.get_memory_footprint() + quantisation_state(model)
    predicted = plan.device("cuda:0").weights
    entry = {
        "model": family,
        "quantization": quantization,
        "predicted": predicted,
        "footprint": real,
        "allocated": held,
        "error_footprint": round(predicted / real - 1, 4),
        "error_allocated": round(predicted / held - 1, 4),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
        "gpu": torch.cuda.get_device_name(0),
    }
    _record(entry)
    assert abs(predicted - real) <= 0.02 * real, entry
    if family == "qwen2.5-3b-width":  # full-size tensors: the allocator's rounding is negligible
        assert abs(predicted - held) <= 0.02 * held, entry
    inputs = {"input_ids": torch.tensor([[1, 2, 3]], device="cuda:0")}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[-1] == 5
    del model
    gc.collect()
    torch.cuda.empty_cache()
