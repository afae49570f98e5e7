"""Bug zoo, case 2: meta tensors after a silent offload (seed 000).

Qwen2.5-Omni on a GPU too small for all of it: ``device_map="auto"`` offloads the last modules
(talker, token2wav) to the cpu behind accelerate hooks, their parameters stay on ``meta``, and
speech generation later fails far from the cause (``self.token2wav.device`` is ``meta``, so the
speaker's reference mel is moved there and ``.item()`` fails). Also Qwen2-Audio on 5.x: with its
audio tower offloaded, ``forward`` moves the features to ``audio_tower.device`` = ``meta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.gpu


def _transformers_before_5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def _speak(model: Any) -> Any:
    """Audio in, speech out, as the Omni model card shows (tiny sizes)."""
    import torch

    thinker = model.config.thinker_config
    inputs = omnifix.testing.tiny_inputs("qwen2.5-omni", model.config, device="cuda:0")
    ids = inputs["input_ids"]
    image = {thinker.image_token_id, thinker.vision_start_token_id, thinker.vision_end_token_id}
    ids = ids[:, [token not in image for token in ids[0].tolist()]]
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
            speaker="Ethan",
            thinker_max_new_tokens=2,
            talker_max_new_tokens=4,
            talker_do_sample=False,
            talker_eos_token_id=[model.config.talker_config.tts_codec_end_token_id],
            token2wav_num_steps=2,
        )


def test_omni_offloaded_by_auto_fails_late_and_omnifix_catches_it(
    tmp_path: Path, record: Callable[..., None], error_of: Callable[..., str]
) -> None:
    from accelerate.utils import compute_module_sizes

    if "qwen2.5-omni" not in omnifix.testing.available_families():
        pytest.skip("this transformers has no Qwen2.5-Omni")
    path = omnifix.testing.save_tiny_model("qwen2.5-omni", tmp_path / "omni")
    model_class = omnifix.testing.model_class("qwen2.5-omni")
    sizes = compute_module_sizes(omnifix.testing.tiny_model("qwen2.5-omni"))
    # A "24 GB card" for the tiny model: room for the thinker and the talker, not for token2wav.
    cap = int((sizes["thinker"] + sizes["talker"]) * 1.1)
    model: Any = model_class.from_pretrained(
        path, device_map="auto", max_memory={0: cap, "cpu": "8GiB"}
    )
    offloaded = sorted(k for k, v in model.hf_device_map.items() if v in {"cpu", "disk"})
    assert offloaded, model.hf_device_map

    before = error_of(lambda: _speak(model))
    if _transformers_before_5():
        assert "meta" in before, before  # 5.x moves the speaker's tensors itself and runs

    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model)
    message = str(caught.value)
    assert any(name in message for name in offloaded), message
    assert message.splitlines()[-1].startswith("Fix:")
    model = None  # free the offloaded model before loading again

    fixed: Any = omnifix.load_safely(path, device="cuda:0")
    omnifix.assert_no_meta(fixed)
    _, wav = _speak(fixed)
    assert wav.numel() > 0
    report = omnifix.placement_report(fixed)
    record(
        case="2. meta tensors after offload (tiny Qwen2.5-Omni, device_map='auto', GPU capped)",
        offloaded_by_auto=", ".join(offloaded),
        before=before or "speech generated (no failure on this version)",
        caught=message.splitlines()[0],
        after=f"load_safely(device='cuda:0'): strategy {report.strategy}, no meta tensors, "
        f"speech generated ({wav.numel()} samples)",
    )


def test_qwen2_audio_offloaded_tower_fails_and_omnifix_catches_it(
    tmp_path: Path,
    record: Callable[..., None],
    module_apart_map: Callable[..., dict[str, Any]],
    error_of: Callable[..., str],
) -> None:
    import torch

    path = omnifix.testing.save_tiny_model("qwen2-audio", tmp_path / "audio")
    model_class = omnifix.testing.model_class("qwen2-audio")
    skeleton = omnifix.testing.tiny_model("qwen2-audio")
    tower = next(
        name
        for name, module in skeleton.named_modules()
        if type(module).__name__.endswith("AudioEncoder")
    )
    device_map = module_apart_map(skeleton, tower, "cpu", 0)
    model: Any = model_class.from_pretrained(path, device_map=device_map)
    inputs = omnifix.testing.tiny_inputs("qwen2-audio", model.config, device="cuda:0")

    def forward() -> object:
        with torch.inference_mode():
            return model(**inputs)

    before = error_of(forward)
    # Recorded on 4.45.2, 4.52.4 and 5.17: forward moves the features to audio_tower.device = meta.
    assert "meta tensor" in before, before
    with pytest.raises(omnifix.MetaTensorError) as caught:
        omnifix.assert_no_meta(model)
    assert tower in str(caught.value)
    model = None  # free the offloaded model before loading again

    fixed: Any = omnifix.load_safely(path, device="cuda:0")
    with torch.inference_mode():
        inputs = omnifix.testing.tiny_inputs(
            "qwen2-audio", fixed.config, device=omnifix.input_device(fixed)
        )
        logits = fixed(**inputs).logits
    assert torch.isfinite(logits).all()
    record(
        case="2b. Qwen2-Audio with its audio tower offloaded to cpu",
        before=before or "forward ran",
        caught=str(caught.value).splitlines()[0],
        after="load_safely(device='cuda:0'): forward runs, no meta tensors",
    )
