"""Bug zoo, case 4: "auto" stored as an input device (Xinference Qwen2-Audio, v1.2.2-v1.6.0).

The backend did ``device = "auto" if device == "cuda" else device``, passed it as ``device_map`` and
later moved the inputs with ``.to(device)``. The device_map word is not a device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.multi_gpu


def _audio_inputs(model: Any, device: Any) -> dict[str, Any]:
    return omnifix.testing.tiny_inputs("qwen2-audio", model.config, device=device)


def test_xinference_qwen2_audio_pattern(tmp_path: Path, record: Callable[..., None]) -> None:
    import torch
    import transformers

    path = omnifix.testing.save_tiny_model("qwen2-audio", tmp_path / "qwen2-audio")
    model_class = omnifix.testing.model_class("qwen2-audio")

    # Before: the backend's own logic, verbatim in spirit.
    device = "cuda"
    device = "auto" if device == "cuda" else device
    model: Any = model_class.from_pretrained(path, device_map=device)
    model.eval()
    inputs = _audio_inputs(model, "cpu")
    with pytest.raises(RuntimeError) as before:
        {k: v.to(device) for k, v in inputs.items()}
    assert "auto" in str(before.value)
    del model

    # After: the same backend with resolve_device_map. For "cuda" on several GPUs the device_map is
    # "auto" and the input device is only known after loading.
    assert omnifix.resolve_device_map("cuda") == ("auto", None)
    # A tiny model fits GPU 0 whole under "auto"; "balanced" spreads it over both GPUs on 4.45.2
    # and 5.17 (4.52.4 keeps it on GPU 0). Splitting it by hand with the audio tower apart trips
    # a 4.x Qwen2-Audio merge bug (indices on another GPU), so that is not done here.
    resolved = omnifix.resolve_device_map("balanced")
    model = model_class.from_pretrained(path, device_map=resolved.device_map)
    model.eval()
    if not transformers.__version__.startswith("4.52."):
        assert len(set(model.hf_device_map.values())) == 2, model.hf_device_map
    where = resolved.input_device or omnifix.input_device(model)
    with torch.inference_mode():
        out = model.generate(**_audio_inputs(model, where), max_new_tokens=2, do_sample=False)
    assert out.shape[-1] > 0
    omnifix.assert_no_meta(model)
    record(
        case="4. 'auto' is not a device (Xinference Qwen2-Audio pattern, 2 GPUs)",
        before=str(before.value).splitlines()[0],
        after=f"resolve_device_map('cuda') -> device_map='auto', input device from "
        f"omnifix.input_device(model) = {where}; generate runs over "
        f"{sorted(set(getattr(model, 'hf_device_map', {'': 0}).values()))}",
    )
