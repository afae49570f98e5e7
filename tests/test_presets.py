"""Built-in presets: the published Qwen checkpoints, rebuilt on meta by each transformers stack.

The expected numbers are published facts, not outputs of omnifix:

* total parameters: the hub's "Model size" (safetensors metadata) of each repository, as listed
  in public model registries: Qwen2-VL-7B-Instruct 8.29B, Qwen2.5-VL-3B-Instruct 3.75B,
  Qwen2.5-VL-7B-Instruct 8.29B, Qwen2.5-Omni-3B 5.54B, Qwen2.5-Omni-7B 10.73B,
  Qwen2-Audio-7B-Instruct 8.40B;
* the per-module breakdown of Qwen2.5-Omni-3B published with a fine-tuning audit of that
  checkpoint, and the Qwen2.5-Omni technical report's 675M vision encoder;
* Qwen2.5-Omni-7B's ``model.safetensors.index.json`` ``total_size`` (22,366,403,936 bytes at
  revision ae9e1690543ffd5c0221dc27f79834d0294cba00), which also pins the dtypes (bf16, with the
  token2wav vocoder in float32);
* the embedding shapes ``(vocab_size, hidden_size)`` of each config.json;
* for the other families, the exact parameter counts of the hub's safetensors metadata.
"""

from __future__ import annotations

import importlib.resources
import json
from functools import cache
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from omnifix import UnsupportedModelError
from omnifix._modules import find_input_embeddings
from omnifix._plan.presets import PRESETS, preset_config, preset_model_class
from omnifix._plan.skeleton import build_skeleton

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

PUBLISHED_PARAMETERS = {
    "qwen2-vl-7b": 8.29e9,
    "qwen2.5-vl-3b": 3.75e9,
    "qwen2.5-vl-7b": 8.29e9,
    "qwen2.5-omni-3b": 5.54e9,
    "qwen2.5-omni-7b": 10.73e9,
    "qwen2-audio-7b": 8.40e9,
    # Exact counts of the hub's safetensors metadata (see tests/test_architectures.py).
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-11b-vision": 10_670_220_835,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 4_300_079_472,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-vl-8b": 8_767_123_696,
    "qwen3-omni-30b-a3b-thinker": None,
    "whisper-large-v3": 1_543_490_560,
    "flan-t5-large": 783_150_080,
    "gpt2": 124_439_808,
}
# Presets whose parameter count could not be read offline (their files say where the values
# come from); the embedding shapes below still check that each release reads them.
UNPUBLISHED = {"qwen2.5-vl-72b", "qwen3-vl-235b-a22b", "qwen3-omni-30b-a3b"}
# (vocab_size, hidden_size) of the language model that reads the caller's input_ids.
EMBEDDING_SHAPE = {
    "qwen2-vl-7b": (152064, 3584),
    "qwen2.5-vl-3b": (151936, 2048),
    "qwen2.5-vl-7b": (152064, 3584),
    "qwen2.5-omni-3b": (151936, 2048),
    "qwen2.5-omni-7b": (152064, 3584),
    "qwen2-audio-7b": (156032, 4096),
    "llama-3.1-8b": (128256, 4096),
    "llama-3.2-11b-vision": (128264, 4096),
    "gemma-3-1b": (262144, 1152),
    "gemma-3-4b": (262208, 2560),
    "mistral-7b-v0.1": (32000, 4096),
    "qwen3-8b": (151936, 4096),
    "qwen3-30b-a3b": (151936, 2048),
    "qwen3-vl-8b": (151936, 4096),
    "qwen3-omni-30b-a3b-thinker": (152064, 2048),
    "whisper-large-v3": (51866, 1280),
    "flan-t5-large": (32128, 1024),
    "gpt2": (50257, 768),
    "qwen2.5-vl-72b": (152064, 8192),
    "qwen3-vl-235b-a22b": (151936, 4096),
    "qwen3-omni-30b-a3b": (152064, 2048),
}
MODEL_CLASS = {
    "qwen2-vl-7b": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl-3b": "Qwen2_5_VLForConditionalGeneration",
    "qwen2.5-vl-7b": "Qwen2_5_VLForConditionalGeneration",
    "qwen2.5-omni-3b": "Qwen2_5OmniForConditionalGeneration",
    "qwen2.5-omni-7b": "Qwen2_5OmniForConditionalGeneration",
    "qwen2-audio-7b": "Qwen2AudioForConditionalGeneration",
    "llama-3.1-8b": "LlamaForCausalLM",
    "llama-3.2-11b-vision": "MllamaForConditionalGeneration",
    "gemma-3-1b": "Gemma3ForCausalLM",
    "gemma-3-4b": "Gemma3ForConditionalGeneration",
    "mistral-7b-v0.1": "MistralForCausalLM",
    "qwen3-8b": "Qwen3ForCausalLM",
    "qwen3-30b-a3b": "Qwen3MoeForCausalLM",
    "qwen3-vl-8b": "Qwen3VLForConditionalGeneration",
    "qwen3-omni-30b-a3b-thinker": "Qwen3OmniMoeThinkerForConditionalGeneration",
    "whisper-large-v3": "WhisperForConditionalGeneration",
    "flan-t5-large": "T5ForConditionalGeneration",
    "gpt2": "GPT2LMHeadModel",
    "qwen2.5-vl-72b": "Qwen2_5_VLForConditionalGeneration",
    "qwen3-vl-235b-a22b": "Qwen3VLMoeForConditionalGeneration",
    "qwen3-omni-30b-a3b": "Qwen3OmniMoeForConditionalGeneration",
}
# The first transformers release that ships each family.
FIRST_RELEASE = {
    "qwen2-vl-7b": "4.45",
    "qwen2.5-vl-3b": "4.49",
    "qwen2.5-vl-7b": "4.49",
    "qwen2.5-omni-3b": "4.52",
    "qwen2.5-omni-7b": "4.52",
    "qwen2-audio-7b": "4.45",
    "llama-3.1-8b": "4.45",
    "llama-3.2-11b-vision": "4.45",
    "gemma-3-1b": "4.50",
    "gemma-3-4b": "4.50",
    "mistral-7b-v0.1": "4.45",
    "qwen3-8b": "4.51",
    "qwen3-30b-a3b": "4.51",
    "qwen3-vl-8b": "4.57",
    "qwen3-omni-30b-a3b-thinker": "4.57",
    "whisper-large-v3": "4.45",
    "flan-t5-large": "4.45",
    "gpt2": "4.45",
    "qwen2.5-vl-72b": "4.49",
    "qwen3-vl-235b-a22b": "4.57",
    "qwen3-omni-30b-a3b": "4.57",
}
INSTALLED = Version(Version(transformers.__version__).base_version)
AVAILABLE = [name for name in PRESETS if Version(FIRST_RELEASE[name]) <= INSTALLED]
LONGEST = max(map(len, PRESETS))
TOLERANCE = 0.005  # the published figures are rounded to 3-4 significant digits


def hub_key(name: str) -> str:
    """A hub id as preset names spell it: no organisation, no ``-Instruct``/``-it``, lower case."""
    return name.strip().lower().rpartition("/")[2].removesuffix("-instruct").removesuffix("-it")


def buildable(*names: str) -> list[Any]:
    """``names`` as parameters, each skipped where the installed transformers predates it."""
    reason = "needs transformers>={} (transformers {} is installed)"
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name not in AVAILABLE,
                reason=reason.format(FIRST_RELEASE[name], transformers.__version__),
            ),
        )
        for name in names
    ]


def too_new(*names: str) -> list[Any]:
    """``names`` as parameters, each skipped where the installed transformers can build it."""
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(name in AVAILABLE, reason="available on this transformers"),
        )
        for name in names
    ]


@cache
def skeleton(name: str) -> nn.Module:
    """One build per preset for the whole file: the tests below only read it."""
    return build_skeleton(name)


def parameters_of(model: nn.Module, class_name: str) -> int:
    """Parameters of the first submodule of that class (its attribute path changed in 5.0)."""
    for module in model.modules():
        if type(module).__name__ == class_name:
            return sum(p.numel() for p in module.parameters())
    pytest.fail(f"no {class_name} in {type(model).__name__}")


def test_every_listed_checkpoint_is_a_preset() -> None:
    assert set(PRESETS) == set(PUBLISHED_PARAMETERS) | UNPUBLISHED


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_is_a_data_file_that_says_where_it_comes_from(name: str) -> None:
    path = importlib.resources.files("omnifix._plan") / "presets" / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert name.startswith(hub_key(data["repo"]))
    assert data["model_class"] == MODEL_CLASS[name]
    assert data["min_transformers"] == FIRST_RELEASE[name]
    assert data["notes"]
    assert all(isinstance(note, str) and note for note in data["notes"])
    assert data["config"]["architectures"]


@pytest.mark.parametrize("name", buildable(*PUBLISHED_PARAMETERS))
def test_skeleton_has_the_published_parameter_count(name: str) -> None:
    model = skeleton(name)
    assert isinstance(model, getattr(transformers, MODEL_CLASS[name]))
    published = PUBLISHED_PARAMETERS[name]
    if published is None:
        pytest.skip(f"no published parameter count of {name}")
    if name == "flan-t5-large" and Version("5.0") <= INSTALLED:
        published -= 32128 * 1024  # transformers 5 ties T5's lm_head whatever the config says
    assert abs(model.num_parameters() - published) <= TOLERANCE * published


@pytest.mark.parametrize("name", buildable(*PRESETS))
def test_skeleton_builds_on_meta_without_allocating(name: str) -> None:
    model = build_skeleton(name)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    real = sum(b.numel() * b.element_size() for b in model.buffers() if b.device.type != "meta")
    # Only small computed buffers (rotary tables, filters) are real; GPT-2 on transformers 4
    # also builds a 1024 x 1024 bool causal mask per block, as from_pretrained does.
    assert real < weights / (10 if name == "gpt2" else 1000)
    assert not model.training


@pytest.mark.parametrize("name", buildable(*PRESETS))
def test_language_model_has_the_published_embedding_shape(name: str) -> None:
    # Each transformers version files the flat config.json fields in its own layout; a field that
    # lands in the wrong place shows up here as a default-sized model.
    (_, embedding), *_ = find_input_embeddings(skeleton(name))
    assert tuple(embedding.weight.shape) == EMBEDDING_SHAPE[name]
    assert embedding.weight.dtype == torch.bfloat16


@pytest.mark.skipif("qwen2.5-omni-3b" not in AVAILABLE, reason="needs transformers>=4.52")
@pytest.mark.parametrize(
    ("class_name", "published"),
    [
        ("Qwen2_5OmniAudioEncoder", 638e6),
        ("Qwen2_5OmniVisionEncoder", 669e6),
        ("Qwen2_5OmniThinkerTextModel", 3.09e9),
        ("Qwen2_5OmniTalkerForConditionalGeneration", 385e6),
        ("Qwen2_5OmniToken2WavModel", 449e6),
    ],
)
def test_omni_3b_parts_match_the_published_breakdown(class_name: str, published: float) -> None:
    count = parameters_of(skeleton("qwen2.5-omni-3b"), class_name)
    assert abs(count - published) <= TOLERANCE * published


@pytest.mark.skipif("qwen2.5-omni-7b" not in AVAILABLE, reason="needs transformers>=4.52")
def test_omni_7b_vision_encoder_is_the_reported_size() -> None:
    count = parameters_of(skeleton("qwen2.5-omni-7b"), "Qwen2_5OmniVisionEncoder")
    assert abs(count - 675e6) <= TOLERANCE * 675e6


@pytest.mark.skipif("qwen2.5-omni-7b" not in AVAILABLE, reason="needs transformers>=4.52")
def test_omni_7b_size_in_bytes_matches_the_checkpoint() -> None:
    from accelerate.utils import compute_module_sizes

    total = compute_module_sizes(skeleton("qwen2.5-omni-7b"))[""]
    assert abs(total - 22_366_403_936) <= 0.001 * 22_366_403_936


@pytest.mark.parametrize("name", buildable("qwen2.5-omni-3b", "qwen2.5-omni-7b"))
def test_dtype_applies_to_the_model_but_token2wav_stays_float32(name: str) -> None:
    model = build_skeleton(name, dtype=torch.float16)
    (_, embedding), *_ = find_input_embeddings(model)
    assert embedding.weight.dtype == torch.float16
    token2wav = next(m for m in model.modules() if type(m).__name__ == "Qwen2_5OmniToken2WavModel")
    assert {p.dtype for p in token2wav.parameters()} == {torch.float32}


def test_dtype_applies_to_every_parameter_of_a_vision_language_model() -> None:
    model = build_skeleton("qwen2-vl-7b", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("name", buildable(*PRESETS))
def test_model_class_is_the_class_that_loads_the_checkpoint(name: str) -> None:
    assert preset_model_class(name) is getattr(transformers, MODEL_CLASS[name])


def test_each_config_is_fresh() -> None:
    first = preset_config("qwen2-vl-7b")
    untouched = first.to_dict()
    first.get_text_config().hidden_size = 8
    first.vision_config.depth = 1
    again = preset_config("qwen2-vl-7b")
    assert again.to_dict() == untouched
    assert again.get_text_config().hidden_size == 3584


@pytest.mark.parametrize("name", too_new(*PRESETS))
def test_preset_too_new_for_transformers_names_the_version_and_the_fix(name: str) -> None:
    needed = FIRST_RELEASE[name]
    functions: list[Callable[[str], object]] = [preset_config, preset_model_class, build_skeleton]
    for function in functions:
        with pytest.raises(TypeError) as caught:  # UnsupportedModelError is a TypeError
            function(name)
        assert isinstance(caught.value, UnsupportedModelError)
        message = str(caught.value)
        assert transformers.__version__ in message
        assert message.endswith(f"pip install 'transformers>={needed}'")


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("qwen2.5-omni7b", "qwen2.5-omni-7b"),
        ("qwen-2.5-vl-3b", "qwen2.5-vl-3b"),
        ("qwen2-audio", "qwen2-audio-7b"),
        ("Qwen2-VL-7", "qwen2-vl-7b"),
    ],
)
def test_unknown_name_suggests_the_closest_preset(typo: str, suggestion: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"Did you mean '{suggestion}'"):
        preset_config(typo)


@given(st.text(max_size=30))
@settings(max_examples=50, deadline=None)
def test_any_other_name_is_refused_with_the_list_and_the_fix(name: str) -> None:
    if hub_key(name) in PRESETS:
        return
    with pytest.raises(UnsupportedModelError) as caught:
        preset_model_class(name)
    message = str(caught.value)
    assert all(repr(preset) in message for preset in PRESETS)
    assert message.endswith("(case does not matter; the hub repository id works too).")


@given(
    name=st.sampled_from(AVAILABLE),
    upper=st.lists(st.booleans(), min_size=LONGEST, max_size=LONGEST),
    repo=st.booleans(),
    instruct=st.booleans(),
)
@settings(max_examples=50, deadline=None)
def test_names_ignore_case_and_accept_hub_repository_ids(
    name: str, upper: list[bool], repo: bool, instruct: bool
) -> None:
    spelled = "".join(c.upper() if u else c for c, u in zip(name, upper, strict=False))
    spelled = ("Qwen/" if repo else "") + spelled + ("-Instruct" if instruct else "")
    assert preset_model_class(spelled) is preset_model_class(name)
