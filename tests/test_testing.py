"""omnifix.testing: tiny Qwen models that build, save, load, run and generate on every stack."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omnifix
import omnifix.testing as ot

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from torch import nn

AVAILABLE = ot.available_families()
MISSING = tuple(family for family in ot.FAMILIES if family not in AVAILABLE)
GENERATES = AVAILABLE  # every family can generate text (the full Omni model through its thinker)


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[ot.Family, Path]:
    """Each available family saved once (seed 0), as a user's test suite would."""
    return {
        family: ot.save_tiny_model(family, tmp_path_factory.mktemp(family.replace(".", "_")))
        for family in AVAILABLE
    }


@pytest.fixture(scope="module")
def loaded(saved: dict[ot.Family, Path]) -> dict[ot.Family, Any]:
    """Each saved family loaded back through the real ``from_pretrained``."""
    models: dict[ot.Family, Any] = {}
    for family, path in saved.items():
        cls: Any = ot.model_class(family)
        models[family] = cls.from_pretrained(path, local_files_only=True).eval()
    return models


def _runner(model: Any, family: ot.Family) -> Any:
    """What takes the inputs: the full Omni model runs them through its thinker."""
    return model.thinker if family == "qwen2.5-omni" else model


def _towers(model: nn.Module) -> tuple[list[Any], list[nn.Module]]:
    """(vision patch mergers, audio encoders), found by structure rather than by path."""
    mergers = [
        m.merger for m in model.modules() if hasattr(m, "patch_embed") and hasattr(m, "merger")
    ]
    audio = [m for m in model.modules() if all(hasattr(m, a) for a in ("conv1", "conv2", "layers"))]
    return mergers, audio


def _rows(output: Any) -> int:
    tensor = output if hasattr(output, "shape") else output[0]
    return int(tensor.shape[:-1].numel())


# --- families and errors -------------------------------------------------------------------------


def test_families_are_ordered_and_the_baseline_is_always_there() -> None:
    assert get_args(ot.Family) == ot.FAMILIES  # every family of the type, in its order
    assert tuple(f for f in ot.FAMILIES if f in AVAILABLE) == AVAILABLE
    assert {"qwen2", "qwen2-vl", "qwen2-audio"} <= set(AVAILABLE)  # all of them exist in 4.45


@pytest.mark.parametrize("family", AVAILABLE)
def test_model_class_is_the_transformers_class(family: ot.Family) -> None:
    import transformers

    cls = ot.model_class(family)
    assert getattr(transformers, cls.__name__) is cls
    assert isinstance(ot.tiny_config(family), cls.config_class)


@pytest.mark.skipif(not MISSING, reason="the installed transformers supports every family")
@pytest.mark.parametrize("family", MISSING)
def test_a_family_this_transformers_lacks_says_which_version_to_install(
    family: ot.Family, tmp_path: Path
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: ot.model_class(family),
        lambda: ot.tiny_config(family),
        lambda: ot.tiny_model(family),
        lambda: ot.save_tiny_model(family, tmp_path),
        lambda: ot.tiny_inputs(family, ot.tiny_config("qwen2")),
        lambda: ot.text_generation_kwargs(family),
    ]
    for call in calls:
        with pytest.raises(omnifix.UnsupportedModelError) as caught:
            call()
        message = str(caught.value)
        assert repr(family) in message
        assert _transformers_version() in message
        assert re.search(r"\. Upgrade it: pip install 'transformers>=4\.\d+'$", message)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_an_unknown_family_is_refused_with_the_known_ones() -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"qwen2\.5-omni-thinker") as caught:
        ot.tiny_config("llama")  # type: ignore[arg-type]
    assert isinstance(caught.value, TypeError)  # UnsupportedModelError is a TypeError too
    assert "'llama'" in str(caught.value)
    assert "Pass one of 'qwen2', 'qwen2-vl'" in str(caught.value)


def test_importing_omnifix_testing_does_not_import_transformers_or_torch() -> None:
    code = (
        "import sys, omnifix.testing; "
        "print(' '.join(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run(  # noqa: S603  # our own interpreter running our own code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""


# --- configs -------------------------------------------------------------------------------------


def _language_configs(config: Any) -> list[Any]:
    """Every decoder config: the text config, plus Omni's talker."""
    thinker = getattr(config, "thinker_config", config)
    found = [thinker.get_text_config()]
    if hasattr(config, "talker_config"):
        found.append(config.talker_config)
    return found


@pytest.mark.parametrize("family", AVAILABLE)
def test_configs_are_tiny_untied_and_splittable(family: ot.Family) -> None:
    config = ot.tiny_config(family)
    assert config.to_dict() == ot.tiny_config(family).to_dict()
    for text in _language_configs(config):
        assert text.num_hidden_layers >= 4
        assert text.hidden_size <= 64
        assert text.vocab_size <= 512
        assert text.tie_word_embeddings is False
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        if "mrope_section" in rope:
            assert sum(rope["mrope_section"]) == head_dim // 2
    thinker = getattr(config, "thinker_config", config)
    vocab = thinker.get_text_config().vocab_size
    for name in ("image_token_id", "video_token_id", "audio_token_id", "vision_start_token_id"):
        if getattr(thinker, name, None) is not None:
            assert 0 <= getattr(thinker, name) < vocab, name


@pytest.mark.parametrize("family", AVAILABLE)
def test_models_are_small_float32_untied_and_in_eval_mode(
    family: ot.Family, loaded: dict[ot.Family, Any]
) -> None:
    import torch

    model = loaded[family]
    runner = _runner(model, family)
    # Untied: the output projection is a tensor of its own, which may go to another device.
    embeddings = runner.get_input_embeddings().weight
    assert embeddings.data_ptr() != runner.get_output_embeddings().weight.data_ptr()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fresh = ot.tiny_model(family)
    assert not fresh.training
    assert {p.dtype for p in fresh.parameters()} == {torch.float32}


# --- save and load -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", AVAILABLE)
def test_from_pretrained_gives_back_the_saved_weights(
    family: ot.Family, saved: dict[ot.Family, Path], loaded: dict[ot.Family, Any]
) -> None:
    import torch

    files = {path.name for path in saved[family].iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert ("spk_dict.pt" in files) == (family == "qwen2.5-omni")
    reference = ot.tiny_model(family).state_dict()
    state = loaded[family].state_dict()
    assert state.keys() == reference.keys()
    different = [key for key, tensor in reference.items() if not torch.equal(state[key], tensor)]
    assert not different


def test_the_full_omni_model_loads_its_speakers(loaded: dict[ot.Family, Any]) -> None:
    import torch

    if "qwen2.5-omni" not in AVAILABLE:
        pytest.skip(f"transformers {_transformers_version()} has no Qwen2.5-Omni")
    speakers = loaded["qwen2.5-omni"].speaker_map
    omni: Any = ot.tiny_model("qwen2.5-omni")
    reference = omni.speaker_map
    assert set(speakers) == set(reference) == {"Chelsie", "Ethan"}
    for name, params in reference.items():
        assert speakers[name]["bos_token"] == params["bos_token"]
        assert torch.equal(speakers[name]["cond"], params["cond"])
        assert torch.equal(speakers[name]["ref_mel"], params["ref_mel"])


def test_save_tiny_model_creates_the_directory_and_returns_it(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    path = ot.save_tiny_model("qwen2", str(target))
    assert path == target
    assert (target / "config.json").is_file()


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", AVAILABLE)
def test_the_seed_decides_the_weights_and_the_global_rng_is_left_alone(
    family: ot.Family, loaded: dict[ot.Family, Any]
) -> None:
    import torch

    before = torch.get_rng_state()
    other = dict(ot.tiny_model(family, seed=1).named_parameters())
    assert torch.equal(torch.get_rng_state(), before)
    seed0 = dict(loaded[family].named_parameters())
    assert seed0.keys() == other.keys()
    # Every parameter drawn at random differs; constant ones (norms, zero biases) agree.
    drawn = [name for name, tensor in seed0.items() if tensor.numel() > 1 and tensor.std() > 0]
    assert drawn
    assert not [name for name in drawn if torch.equal(seed0[name], other[name])]


@pytest.mark.parametrize("family", AVAILABLE)
def test_inputs_are_deterministic(family: ot.Family) -> None:
    import torch

    config = ot.tiny_config(family)
    first = ot.tiny_inputs(family, config, batch_size=2)
    second = ot.tiny_inputs(family, config, batch_size=2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


# --- inputs --------------------------------------------------------------------------------------


def _qwen2_audio_expands_itself() -> bool:
    """transformers < 4.48: Qwen2-Audio takes one <|AUDIO|> per sample and expands it itself."""
    from packaging.version import Version

    return Version(_transformers_version()) < Version("4.48")


@pytest.mark.parametrize("family", AVAILABLE)
def test_forward_gives_finite_logits_and_placeholders_match_the_towers(
    family: ot.Family, loaded: dict[ot.Family, Any]
) -> None:
    import torch

    model = _runner(loaded[family], family)
    config = getattr(model.config, "thinker_config", model.config)
    inputs = ot.tiny_inputs(family, loaded[family].config, batch_size=2)
    mergers, encoders = _towers(model)
    produced = {"image": 0, "audio": 0}

    def count(kind: str) -> Any:
        return lambda _module, _args, output: produced.__setitem__(kind, _rows(output))

    hooks = [m.register_forward_hook(count("image")) for m in mergers]
    hooks += [m.register_forward_hook(count("audio")) for m in encoders]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    ids = inputs["input_ids"]
    image_id = getattr(config, "image_token_id", None)
    audio_id = getattr(config, "audio_token_id", None) or getattr(config, "audio_token_index", None)
    images = int((ids == image_id).sum()) if image_id is not None else 0
    audios = int((ids == audio_id).sum()) if audio_id is not None else 0
    has_image = family in {"qwen2-vl", "qwen2.5-vl", "qwen2.5-omni-thinker", "qwen2.5-omni"}
    has_audio = family in {"qwen2-audio", "qwen2.5-omni-thinker", "qwen2.5-omni"}
    assert (produced["image"] > 0, produced["audio"] > 0) == (has_image, has_audio)
    assert images == produced["image"]
    if family == "qwen2-audio" and _qwen2_audio_expands_itself():
        assert audios == ids.shape[0]
        assert logits.shape[1] == ids.shape[1] - 1 + produced["audio"] // ids.shape[0]
    else:
        assert audios == produced["audio"]
        assert logits.shape[1] == ids.shape[1]
    assert logits.shape[0] == 2
    assert logits.shape[-1] == config.get_text_config().vocab_size
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", GENERATES)
def test_generate_runs_from_the_tiny_inputs(
    family: ot.Family, loaded: dict[ot.Family, Any]
) -> None:
    import torch

    model = loaded[family]
    inputs = ot.tiny_inputs(family, model.config, batch_size=2)
    kwargs = ot.text_generation_kwargs(family, max_new_tokens=2)
    sequences = model.generate(**inputs, **kwargs)
    assert isinstance(sequences, torch.Tensor)
    prompt = inputs["input_ids"]
    assert sequences.shape[0] == 2
    assert prompt.shape[1] < sequences.shape[1] <= prompt.shape[1] + 2
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt)


def test_the_full_omni_model_speaks_with_its_tiny_talker_and_token2wav(
    loaded: dict[ot.Family, Any],
) -> None:
    import torch

    if "qwen2.5-omni" not in AVAILABLE:
        pytest.skip(f"transformers {_transformers_version()} has no Qwen2.5-Omni")
    model = loaded["qwen2.5-omni"]
    thinker = model.config.thinker_config
    inputs = ot.tiny_inputs("qwen2.5-omni", model.config)
    # Audio in, audio out. (5.x hands pixel_values on to the talker, which refuses them.)
    ids = inputs.pop("input_ids")
    image = {thinker.image_token_id, thinker.vision_start_token_id, thinker.vision_end_token_id}
    ids = ids[:, [token not in image for token in ids[0].tolist()]]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": inputs["input_features"],
        "feature_attention_mask": inputs["feature_attention_mask"],
    }
    text, wav = model.generate(
        **inputs,
        speaker="Ethan",
        thinker_max_new_tokens=2,
        talker_max_new_tokens=4,
        talker_do_sample=False,
        talker_eos_token_id=[model.config.talker_config.tts_codec_end_token_id],
        token2wav_num_steps=2,  # one Runge-Kutta step of the DiT instead of nine
    )
    assert torch.equal(text[:, : ids.shape[1]], ids)
    assert wav.ndim == 1
    assert wav.numel() > 0
    assert torch.isfinite(wav).all()


@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(AVAILABLE),
    batch_size=st.integers(1, 3),
    text_tokens=st.integers(0, 12),
)
def test_inputs_have_the_layout_the_processors_make(
    family: ot.Family, batch_size: int, text_tokens: int
) -> None:
    import torch

    config = ot.tiny_config(family)
    inputs = ot.tiny_inputs(family, config, batch_size=batch_size, text_tokens=text_tokens)
    source = getattr(config, "thinker_config", config)
    ids = inputs["input_ids"]
    assert ids.dtype == torch.long
    assert ids.shape[0] == batch_size
    assert torch.equal(inputs["attention_mask"], torch.ones_like(ids))
    assert ((ids >= 0) & (ids < source.get_text_config().vocab_size)).all()
    special = {
        getattr(source, name)
        for name in dir(source)
        if name.endswith(("_token_id", "_token_index")) and isinstance(getattr(source, name), int)
    }
    is_text = ~torch.isin(ids, torch.tensor(sorted(special)))
    # Every other position is a placeholder or a delimiter, and all samples share one layout.
    assert (is_text.sum(-1) == text_tokens).all()
    assert (ids.masked_fill(is_text, -1) == ids[:1].masked_fill(is_text[:1], -1)).all()
    if "pixel_values" in inputs:
        vision = source.vision_config
        grid = inputs["image_grid_thw"]
        assert grid.shape == (batch_size, 3)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), width)
        per_image = grid.prod(-1) // vision.spatial_merge_size**2
        assert torch.equal((ids == source.image_token_id).sum(-1), per_image)
    if "input_features" in inputs:
        features, mask = inputs["input_features"], inputs["feature_attention_mask"]
        assert features.shape[:2] == (batch_size, source.audio_config.num_mel_bins)
        assert mask.shape == (batch_size, features.shape[-1])
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        assert torch.equal(types == 1, ids == source.image_token_id)


def test_inputs_go_to_the_device_asked_for() -> None:
    import torch

    config = ot.tiny_config("qwen2-vl")
    for device in ("cpu", torch.device("cpu")):
        inputs = ot.tiny_inputs("qwen2-vl", config, device=device)
        assert {tensor.device for tensor in inputs.values()} == {torch.device("cpu")}


@pytest.mark.parametrize(("batch_size", "text_tokens"), [(0, 8), (1, -1)])
def test_impossible_input_sizes_are_refused(batch_size: int, text_tokens: int) -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="Pass batch_size >= 1"):
        ot.tiny_inputs(
            "qwen2", ot.tiny_config("qwen2"), batch_size=batch_size, text_tokens=text_tokens
        )


@pytest.mark.parametrize(("family", "other"), [("qwen2-vl", "qwen2"), ("qwen2-audio", "qwen2-vl")])
def test_inputs_for_a_config_without_the_tower_say_what_to_pass(
    family: ot.Family, other: ot.Family
) -> None:
    with pytest.raises(omnifix.UnsupportedModelError, match=r"Pass the config of the model"):
        ot.tiny_inputs(family, ot.tiny_config(other))


def test_text_generation_kwargs_only_differ_for_the_full_omni_model() -> None:
    for family in AVAILABLE:
        kwargs = ot.text_generation_kwargs(family, max_new_tokens=3)
        if family == "qwen2.5-omni":
            assert kwargs["thinker_max_new_tokens"] == 3
            assert kwargs.get("return_audio", False) is False
            assert kwargs.get("generation_mode", "text") == "text"
        else:
            assert kwargs == {"max_new_tokens": 3}
