"""lean_dispatch on two real GPUs: every tiny family split layer by layer, and load_safely's split.

Each family is saved as a checkpoint and loaded twice with ``from_pretrained``: whole on cuda:0
(the reference), and with a per-layer ``device_map`` (first half of every language model's layers,
the towers and the embeddings on cuda:0; the second half, the final norm, the rotary embedding and
the head on cuda:1), which puts accelerate's hooks on it. ``lean_dispatch`` then replaces them and
greedy ``generate`` must give the reference's tokens, with the inputs on cuda:0, cuda:1 or the
cpu. float32 weights, so both placements run the same kernels on the same numbers.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing as ot
from omnifix._attention import choose_attention, choose_dtype, gpu_capabilities
from omnifix._compat import dtype_keyword

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType

    import torch

    from omnifix.testing import Family

pytestmark = pytest.mark.multi_gpu

Model = Any
NEW_TOKENS = 4


def accelerate_hooks(model: Model) -> dict[str, object]:
    return {
        name: module._hf_hook
        for name, module in model.named_modules()
        if hasattr(module, "_hf_hook")
    }


def float32() -> dict[str, Any]:
    import torch

    return {dtype_keyword(): torch.float32}


def generate(model: Model, family: Family, device: str | torch.device) -> torch.Tensor:
    import torch

    omni = family == "qwen2.5-omni"
    config = model.config.thinker_config if omni else model.config
    inputs = ot.tiny_inputs(family, config, device=device)
    kwargs = ot.text_generation_kwargs(family, max_new_tokens=NEW_TOKENS)
    kwargs["thinker_do_sample" if omni else "do_sample"] = False  # greedy
    with torch.no_grad():
        out: torch.Tensor = model.generate(**inputs, **kwargs)
    return out.cpu()


def clean() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("family", ot.available_families())
def test_split_family_generates_what_one_gpu_generates(
    family: Family, tmp_path: Path, bench_models: ModuleType
) -> None:
    import torch

    path = ot.save_tiny_model(family, tmp_path / "model")
    model_class: Any = ot.model_class(family)
    single = model_class.from_pretrained(path, device_map={"": 0}, **float32()).eval()
    reference = generate(single, family, "cuda:0")
    del single
    clean()

    device_map = bench_models.layer_split_map(ot.tiny_model(family), 0, 1)
    model = model_class.from_pretrained(path, device_map=device_map, **float32()).eval()
    before = accelerate_hooks(model)
    assert len(before) > len(device_map)  # accelerate: a hook on every module with weights
    lean = omnifix.lean_dispatch(model)
    assert lean.devices == ("cuda:0", "cuda:1")
    assert 0 < lean.hooks <= len(device_map) + 1
    assert lean.replaced == len(before)
    assert omnifix.placement_report(model).hooks == "lean"
    assert omnifix.input_device(model) == torch.device("cuda", 0)
    for device in ("cuda:0", "cuda:1", "cpu"):
        assert torch.equal(generate(model, family, device), reference), device
    lean.remove()
    after = accelerate_hooks(model)
    assert after.keys() == before.keys()
    assert all(after[name] is hook for name, hook in before.items())
    assert omnifix.placement_report(model).hooks == "accelerate"
    assert torch.equal(generate(model, family, "cuda:0"), reference)


def test_a_given_map_moves_the_model_and_matches_one_gpu(
    tmp_path: Path, bench_models: ModuleType
) -> None:
    import torch

    family: Family = "qwen2-vl"
    path = ot.save_tiny_model(family, tmp_path / "model")
    model_class: Any = ot.model_class(family)
    single = model_class.from_pretrained(path, device_map={"": 0}, **float32()).eval()
    reference = generate(single, family, "cuda:0")
    del single
    clean()
    model = model_class.from_pretrained(path, **float32()).eval()  # on the cpu, no hooks
    device_map = bench_models.layer_split_map(model, 0, 1)
    with omnifix.lean_dispatch(model, device_map=device_map) as lean:
        assert model.hf_device_map == device_map
        assert lean.replaced == 0
        for name, index in device_map.items():
            tensors = [
                *model.get_submodule(name).parameters(),
                *model.get_submodule(name).buffers(),
            ]
            assert {tensor.device for tensor in tensors} <= {torch.device("cuda", index)}, name
        assert torch.equal(generate(model, family, "cpu"), reference)
        assert torch.equal(generate(model, family, "cuda:1"), reference)
    assert accelerate_hooks(model) == {}


def test_the_callers_current_device_comes_back_even_after_an_error(
    tmp_path: Path, bench_models: ModuleType
) -> None:
    """Entries make their GPU current (fewer device switches per kernel); the caller's returns."""
    import torch

    family: Family = "qwen2"
    path = ot.save_tiny_model(family, tmp_path / "model")
    model_class: Any = ot.model_class(family)
    model = model_class.from_pretrained(path, **float32()).eval()
    device_map = bench_models.layer_split_map(model, 0, 1)
    seen: list[int] = []
    last = max(name for name, index in device_map.items() if index == 1 and "layers" in name)
    layer = model.get_submodule(last)
    with omnifix.lean_dispatch(model, device_map=device_map):
        handle = layer.register_forward_pre_hook(
            lambda *_: seen.append(torch.cuda.current_device())
        )
        for caller in (0, 1):
            torch.cuda.set_device(caller)
            generate(model, family, "cuda:0")
            assert torch.cuda.current_device() == caller
        assert set(seen) == {1}  # the layer on cuda:1 ran with cuda:1 current
        handle.remove()

        def fail(*_: object) -> None:
            raise RuntimeError("planted")

        handle = layer.register_forward_pre_hook(fail)
        torch.cuda.set_device(0)
        with pytest.raises(RuntimeError, match="planted"):
            generate(model, family, "cuda:0")
        assert torch.cuda.current_device() == 0
        handle.remove()


def test_tied_weights_on_two_gpus_are_refused(tied_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model: Model = AutoModelForCausalLM.from_pretrained(tied_lm_dir).eval()
    device_map = {"model": 0, "lm_head": 1}  # lm_head.weight is embed_tokens.weight
    with pytest.raises(omnifix.DeviceError, match="share a tensor") as raised:
        omnifix.lean_dispatch(model, device_map=device_map)
    assert str(raised.value).endswith("Fix: map both to the same device.")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}  # not moved


# --- load_safely: a split forced by max_memory ------------------------------------------------


def test_load_safely_splits_with_lean_hooks_and_matches_one_gpu(
    medium_qwen2: Path, split_cap: Callable[[Path, torch.dtype, str], int]
) -> None:
    import torch

    path = medium_qwen2
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    capabilities = gpu_capabilities(gpus)
    dtype = choose_dtype("auto", capabilities=capabilities)
    cap = split_cap(path, dtype, choose_attention("auto", dtype=dtype, capabilities=capabilities))
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))

    def tokens(model: Model, device: str) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model.generate(ids.to(device), max_new_tokens=8, do_sample=False)
        return out.cpu()

    clean()
    single = omnifix.load_safely(path, device="cuda:0")
    reference = tokens(single, "cuda:0")
    del single
    clean()

    model = omnifix.load_safely(path, device="cuda", max_memory={0: cap, 1: cap})
    report = omnifix.placement_report(model)
    assert report.strategy == "split"
    assert report.hooks == "lean"
    assert "hooks: lean" in str(report)
    assert report.pinned_embeddings == ("model.embed_tokens",)
    assert [usage.device for usage in report.devices] == ["cuda:0", "cuda:1"]
    assert report.input_device in gpus
    entries = len(model.hf_device_map)
    hooked = sum(1 for module in model.modules() if hasattr(module, "_hf_hook"))
    assert 0 < hooked <= entries + 1
    for device in ("cuda:0", "cuda:1", "cpu"):
        assert torch.equal(tokens(model, device), reference), device
    del model
    clean()

    kept = omnifix.load_safely(path, device="cuda", max_memory={0: cap, 1: cap}, hooks="accelerate")
    assert omnifix.placement_report(kept).hooks == "accelerate"
    assert sum(1 for module in kept.modules() if hasattr(module, "_hf_hook")) > len(
        kept.hf_device_map
    )
    assert torch.equal(tokens(kept, "cuda:0"), reference)


@pytest.mark.multi_gpu
def test_copies_between_the_gpus_are_checked_once_and_found_sound(
    record: Callable[..., None],
) -> None:
    import time

    import torch

    from omnifix._copies import check_copies

    gpus = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    start = time.perf_counter()
    checked = check_copies(gpus)
    seconds = time.perf_counter() - start
    assert checked in (0, len(gpus) * (len(gpus) - 1))  # 0: an earlier test checked them
    assert check_copies(gpus) == 0
    record(
        case="boundary self-test: copies between every pair of GPUs",
        before="",
        after=f"{checked} ordered pairs checked in {seconds * 1e3:.1f} ms, all sound",
    )
