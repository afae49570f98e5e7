"""Bug zoo, case 5: bf16, the best attention available, memory matching the report.

Users asked for ``attn_implementation="flash_attention_2"`` on a machine without flash-attn and got
transformers' ImportError; ``load_safely`` falls back to sdpa with a warning and loads in bf16.
With flash-attn installed, every family loads with it in bf16 (the model and each sub-model), and
its logits agree with sdpa's.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing
import omnifix.testing as ot

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType

    import torch

pytestmark = pytest.mark.gpu


def test_flash_attention_missing_falls_back_with_a_warning(
    tmp_path: Path, record: Callable[..., None]
) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: nothing to fall back from")
    path = omnifix.testing.save_tiny_model("qwen2-vl", tmp_path / "qwen2-vl")
    model_class = omnifix.testing.model_class("qwen2-vl")

    with pytest.raises(ImportError) as before:
        model_class.from_pretrained(
            path,
            device_map={"": 0},
            attn_implementation="flash_attention_2",
            torch_dtype=torch.bfloat16,
        )

    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(0)
    with pytest.warns(omnifix.OmnifixWarning, match="sdpa") as warned:
        model: Any = omnifix.load_safely(
            path, device="cuda:0", attn_implementation="flash_attention_2"
        )
    loaded = torch.cuda.memory_allocated(0) - start
    report = omnifix.placement_report(model)
    assert model.config._attn_implementation == "sdpa"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {expected}
    reported = report.total_weights
    # The caching allocator rounds every tensor up to 512 bytes: on a 260 KB model that is several
    # percent, on a real one nothing. Allow exactly that rounding.
    tensors = len([*model.parameters(), *model.buffers()])
    assert abs(reported - loaded) <= max(0.03 * loaded, 512 * tensors), (reported, loaded)
    with torch.inference_mode():
        out = model.generate(
            **omnifix.testing.tiny_inputs("qwen2-vl", model.config, device="cuda:0"),
            max_new_tokens=2,
        )
    assert out.device == torch.device("cuda:0")
    record(
        case="5. flash_attention_2 requested without flash-attn (tiny Qwen2-VL, one GPU)",
        before=f"{type(before.value).__name__}: {str(before.value).splitlines()[0]}",
        warning=str(warned[0].message).splitlines()[0],
        after=f"load_safely: {expected}, sdpa, report {reported} B vs torch.cuda.memory_allocated "
        f"{loaded} B ({reported / loaded - 1:+.2%}); generate runs",
    )


def _flash_installed() -> bool:
    from omnifix._attention import installed_attention

    return "flash_attention_2" in installed_attention()


def _sub_model_attention(model: Any) -> dict[str, str]:
    """The attention implementation of the model ("") and of each of its sub-models."""
    from transformers import PreTrainedModel

    return {
        name: module.config._attn_implementation
        for name, module in model.named_modules()
        if isinstance(module, PreTrainedModel)
    }


def _last_logits(model: Any, family: ot.Family, device: str) -> torch.Tensor:
    import torch

    config = model.config.thinker_config if family == "qwen2.5-omni" else model.config
    runner = model.thinker if family == "qwen2.5-omni" else model
    inputs = ot.tiny_inputs(family, config, batch_size=2, device=device)
    with torch.no_grad():
        logits: torch.Tensor = runner(**inputs).logits
    return logits[:, -1].float().cpu()


#: flash-attn and sdpa round differently (bf16 keeps 8 significant bits: one unit in the last
#: place is 2**-7 of a value's magnitude); through a few layers that gives a few units at the
#: largest logit. 4 units (2**-5 of the largest |logit|) separates rounding from a wrong result.
_FLASH_TOLERANCE = 2**-5


@pytest.mark.parametrize("family", ot.available_families())
def test_flash_attention_loads_every_family_in_bf16_and_matches_sdpa(
    family: ot.Family, tmp_path: Path, record: Callable[..., None]
) -> None:
    import torch

    if not _flash_installed():
        pytest.skip("flash-attn is not installed here (run on the image+fa2 stack)")
    path = ot.save_tiny_model(family, tmp_path / family)
    model: Any = omnifix.load_safely(path, device="cuda:0")  # "auto": flash-attn where it runs
    report = omnifix.placement_report(model)
    assert report.dtype == torch.bfloat16
    assert report.attn_implementation == "flash_attention_2"
    used = _sub_model_attention(model)
    # Each sub-model runs flash-attn, or the report names the one that does not.
    assert {name for name, value in used.items() if value != "flash_attention_2"} == set(
        report.attention
    )
    flash = _last_logits(model, family, "cuda:0")
    del model
    sdpa_model: Any = omnifix.load_safely(path, device="cuda:0", attn_implementation="sdpa")
    assert set(_sub_model_attention(sdpa_model).values()) == {"sdpa"}
    sdpa = _last_logits(sdpa_model, family, "cuda:0")
    scale = sdpa.abs().max().item()
    difference = (flash - sdpa).abs().max().item()
    record(
        case=f"5. flash_attention_2 installed: {family} in bf16 on one GPU",
        before="",
        after=f"load_safely: bfloat16, flash_attention_2 (sub-models: {dict(report.attention)} "
        f"differ), last-token logits vs sdpa: max |diff| {difference:.3g} = "
        f"{difference / scale:.2%} of max |logit| {scale:.3g}",
    )
    assert difference <= _FLASH_TOLERANCE * scale, (difference, scale)


@pytest.mark.multi_gpu
def test_flash_attention_on_a_split_matches_one_gpu(
    tmp_path: Path, record: Callable[..., None], bench_models: ModuleType
) -> None:
    import torch

    if not _flash_installed():
        pytest.skip("flash-attn is not installed here (run on the image+fa2 stack)")
    family: ot.Family = "qwen2-vl"
    path = ot.save_tiny_model(family, tmp_path / family)
    device_map = bench_models.layer_split_map(ot.tiny_model(family), "cuda:0", "cuda:1")
    split: Any = omnifix.load_safely(path, device_map=device_map)
    assert omnifix.placement_report(split).attn_implementation == "flash_attention_2"
    one: Any = omnifix.load_safely(path, device="cuda:0")
    split_logits = _last_logits(split, family, "cuda:0")
    one_logits = _last_logits(one, family, "cuda:0")
    torch.testing.assert_close(split_logits, one_logits)
    record(
        case="5. flash_attention_2 installed: qwen2-vl in bf16 split over two GPUs",
        before="",
        after="load_safely with a per-layer split: flash_attention_2, logits equal to one GPU's",
    )
