"""Bug zoo, case 1: the embedding seam of a model split over two GPUs.

Seed report: Qwen2-VL with ``device_map="auto"`` over two GPUs on transformers 4.45.2; ``generate``
fails with "Expected all tensors to be on the same device, but got mask is on cuda:0, different from
other tensors on cuda:1 (masked_scatter_)". The user put the inputs on ``model.device`` (the vision
tower's device, cuda:0) while ``embed_tokens`` ran on cuda:1 and returned its output there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from torch import nn

pytestmark = pytest.mark.multi_gpu


def _load_split_qwen2_vl(
    path: Path, module_apart_map: Callable[..., dict[str, Any]]
) -> tuple[Any, str]:
    """Qwen2-VL split as users get it: the vision tower on GPU 0, the language model on GPU 1.

    First ``device_map="auto"`` with GPU 0 capped to the vision tower (what 4.45.2 users got on
    real cards, where the tower and the first layers fill GPU 0); where that does not split the
    tiny model (transformers 5.x places it whole), the same placement as an explicit map.
    """
    from accelerate.utils import compute_module_sizes

    from omnifix._modules import find_input_embeddings

    model_class = omnifix.testing.model_class("qwen2-vl")
    skeleton = omnifix.testing.tiny_model("qwen2-vl")
    tower = next(
        name
        for name, module in skeleton.named_modules()
        if type(module).__name__.startswith("Qwen2VisionTransformer")
    )
    sizes = compute_module_sizes(skeleton)
    max_memory = {0: int(sizes[tower] * 1.05), 1: "1GiB"}
    model: Any = model_class.from_pretrained(path, device_map="auto", max_memory=max_memory)
    how = f'device_map="auto", max_memory={{0: {max_memory[0]}, 1: "1GiB"}}'
    embed_name = find_input_embeddings(model)[0][0]
    placed = getattr(model, "hf_device_map", {})

    def device_of(name: str) -> object:
        keys = [key for key in placed if key in {"", name} or name.startswith(key + ".")]
        return placed[max(keys, key=len)] if keys else None

    if (device_of(tower), device_of(embed_name)) != (0, 1):
        del model
        device_map = module_apart_map(skeleton, tower, 0, 1)
        model = model_class.from_pretrained(path, device_map=device_map)
        how = f"device_map={device_map} (device_map='auto' placed it whole on this version)"
    model.eval()
    return model, how


def _inputs_on(device: Any, model: nn.Module) -> dict[str, Any]:
    return omnifix.testing.tiny_inputs("qwen2-vl", model.config, device=device)  # type: ignore[arg-type]


def _generate(model: Any, device: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model.generate(**_inputs_on(device, model), max_new_tokens=2, do_sample=False)


def test_qwen2_vl_split_generate(
    tmp_path: Path,
    record: Callable[..., None],
    module_apart_map: Callable[..., dict[str, Any]],
    error_of: Callable[..., str],
) -> None:
    import torch
    import transformers

    path = omnifix.testing.save_tiny_model("qwen2-vl", tmp_path / "qwen2-vl")
    model, how = _load_split_qwen2_vl(path, module_apart_map)
    assert model.device == torch.device("cuda:0")  # the first parameter: the vision tower
    assert omnifix.input_device(model) == torch.device("cuda:1")  # where embed_tokens runs

    # Before: what users write, inputs on model.device.
    before = error_of(lambda: _generate(model, model.device))
    # input_device alone: accelerate's root hook moves every input to the map's main device
    # (cuda:0) before forward runs, so where the caller puts them cannot fix this seam.
    on_input_device = error_of(lambda: _generate(model, omnifix.input_device(model)))
    if transformers.__version__.startswith("4.45."):
        assert "masked_scatter" in before, before
        assert "cuda:0" in before
        assert "cuda:1" in before
        assert "masked_scatter" in on_input_device, on_input_device

    # After: pin_embeddings, inputs wherever the caller puts them.
    with omnifix.pin_embeddings(model) as pin:
        out = _generate(model, model.device)
        out_other = _generate(model, omnifix.input_device(model))
    assert pin.modules
    assert out.device == torch.device("cuda:0")
    assert out_other.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), out_other.cpu())
    assert out.shape[-1] == _inputs_on("cpu", model)["input_ids"].shape[-1] + 2
    omnifix.assert_no_meta(model)
    # Unpinned again, the seam is as it was.
    assert error_of(lambda: _generate(model, model.device)) == before
    record(
        case="1. embed_tokens on cuda:1, inputs on cuda:0 (Qwen2-VL split over 2 GPUs)",
        placement=how,
        before=before or "generate ran (no seam error on this version)",
        input_device_alone=on_input_device or "generate ran",
        after="pin_embeddings: generate runs with inputs on model.device (cuda:0) and on "
        "omnifix.input_device(model) (cuda:1); same tokens",
    )


def test_hookless_placement_fails_at_index_select(record: Callable[..., None]) -> None:
    """Modules moved with ``.to()`` (no accelerate hooks): ids on cuda:0, embedding on cuda:1."""
    import torch

    model: Any = omnifix.testing.tiny_model("qwen2")
    model.to("cuda:0")
    embedding = model.get_input_embeddings()
    embedding.to("cuda:1")
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda:0")

    with pytest.raises(RuntimeError) as before:
        model(input_ids=ids)
    assert "index_select" in str(before.value) or "same device" in str(before.value)

    with torch.inference_mode(), omnifix.pin_embeddings(model):
        logits = model(input_ids=ids).logits
    assert logits.device == torch.device("cuda:0")
    assert torch.isfinite(logits).all()

    # Indexing the weight directly is not a forward call: no hook can see it.
    with pytest.raises(RuntimeError) as direct:
        embedding.weight[ids]
    assert "indices should be either on cpu or on the same device" in str(direct.value)
    # ... but input_device says where the ids must go.
    assert embedding.weight[ids.to(omnifix.input_device(model))].device == torch.device("cuda:1")
    record(
        case="1b. hook-less placement: embedding moved to cuda:1 with .to(), ids on cuda:0",
        before=str(before.value).splitlines()[0],
        after="forward runs with pin_embeddings; direct weight[ids] indexing still fails "
        f"({str(direct.value).splitlines()[0]!r}) and is fixed by "
        "ids.to(omnifix.input_device(model))",
    )
