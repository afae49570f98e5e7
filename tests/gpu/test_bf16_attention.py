"""Bug zoo, case 5: bf16, the best attention available, memory matching the report (seed 001).

Users asked for ``attn_implementation="flash_attention_2"`` on a machine without flash-attn and got
transformers' ImportError; ``load_safely`` falls back to sdpa with a warning and loads in bf16.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

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
