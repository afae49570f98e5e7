"""load_safely on real GPUs: dtype/attention choice, one GPU, a pinned GPU, a split, no leftovers.

Memory is compared with ``torch.cuda.memory_allocated`` deltas (other tests may hold memory), and
the report's measured bytes must match what the allocator holds for the weights.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing as ot
from omnifix import CheckpointError, load_safely, placement_report
from omnifix._attention import choose_attention, choose_dtype, gpu_capabilities
from omnifix._compat import dtype_keyword

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import torch

    from omnifix.testing import Family

# The CUDA caching allocator rounds every tensor up to 512 bytes.
_ROUNDING = 512


def _clean() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    for index in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(index)


def _allocated() -> list[int]:
    import torch

    return [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]


def _tensor_count(model: Any) -> int:
    return len({id(t) for t in (*model.parameters(), *model.buffers())})


def _expected_choice(devices: list[torch.device]) -> tuple[torch.dtype, str]:
    capabilities = gpu_capabilities(devices)
    dtype = choose_dtype("auto", capabilities=capabilities)
    return dtype, choose_attention("auto", dtype=dtype, capabilities=capabilities)


def _logits(model: Any, family: Family, device: torch.device) -> torch.Tensor:
    import torch

    config = model.config.thinker_config if family == "qwen2.5-omni" else model.config
    runner = model.thinker if family == "qwen2.5-omni" else model
    with torch.no_grad():
        logits: torch.Tensor = runner(**ot.tiny_inputs(family, config, device=device)).logits
    return logits.float().cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ot.available_families())
def test_one_gpu_matches_from_pretrained_and_the_allocator(family: Family, tmp_path: Path) -> None:
    import torch

    path = ot.save_tiny_model(family, tmp_path / "model")
    gpu = torch.device("cuda", 0)
    _clean()
    before = _allocated()
    model = load_safely(path, device="cuda:0")
    after = _allocated()
    dtype, attention = _expected_choice([gpu])
    assert {p.device for p in model.parameters()} == {gpu}
    assert model.config._attn_implementation == attention
    report = placement_report(model)
    assert report.strategy == "single"
    assert report.dtype == dtype
    usage = report.usage(gpu)
    assert usage is not None
    assert usage.predicted_peak is not None
    assert usage.budget is not None
    # What the report measured is what the allocator holds for the weights (tiny models: no
    # other allocation happens while loading stays on the GPU).
    grown = after[0] - before[0]
    assert usage.weights <= grown <= usage.weights + _ROUNDING * _tensor_count(model)
    ours = _logits(model, family, gpu)
    # Loading and a forward pass stayed within the plan's prediction for this device.
    assert torch.cuda.max_memory_allocated(0) - before[0] <= usage.predicted_peak
    # A plain load with the same choices computes the same logits.
    plain_kwargs: dict[str, Any] = {"device_map": {"": "cuda:0"}, "attn_implementation": attention}
    plain_kwargs[dtype_keyword()] = dtype
    plain = ot.model_class(family).from_pretrained(path, **plain_kwargs).eval()
    torch.testing.assert_close(ours, _logits(plain, family, gpu))


@pytest.mark.gpu
def test_refused_and_failed_loads_leave_no_gpu_memory(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2", tmp_path / "model")
    _clean()
    before = _allocated()
    with pytest.raises(omnifix.InsufficientMemoryError):
        load_safely(path, device="cuda:0", max_memory={0: "1KiB"})
    assert _allocated() == before
    # A checkpoint whose last shard is cut in half: the first shards reach the GPU, then fail.
    sharded = tmp_path / "sharded"
    ot.tiny_model("qwen2").save_pretrained(sharded, max_shard_size="100KB")
    last = max(sharded.glob("*.safetensors"))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError) as raised:
        load_safely(sharded, device="cuda:0")
    assert raised.value.__cause__ is not None  # the original error stays reachable...
    gc.collect()
    assert _allocated() == before  # ...without keeping the half-loaded model on the GPU


@pytest.mark.multi_gpu
def test_a_named_gpu_is_the_only_one_used(tmp_path: Path) -> None:
    import torch

    path = ot.save_tiny_model("qwen2-vl", tmp_path / "model")
    _clean()
    before = _allocated()
    model = load_safely(path, device="cuda:1")
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 1)}
    assert _allocated()[0] == before[0]
    report = placement_report(model)
    assert [usage.device for usage in report.devices] == ["cuda:1"]
    assert report.input_device == torch.device("cuda", 1)
    assert report.pinned_embeddings == ()  # one device: no hooks added


@pytest.mark.multi_gpu
def test_auto_keeps_a_model_that_fits_on_one_gpu(tmp_path: Path) -> None:
    path = ot.save_tiny_model("qwen2-vl", tmp_path / "model")
    model = load_safely(path)
    report = placement_report(model)
    assert report.strategy == "single"
    assert len(report.devices) == 1
    assert not hasattr(model, "hf_device_map") or len(set(model.hf_device_map.values())) == 1


@pytest.mark.multi_gpu
def test_split_over_two_gpus_pins_embeddings_and_matches_one_gpu(
    medium_qwen2: Path, split_cap: Callable[[Path, torch.dtype, str], int]
) -> None:
    import torch

    path = medium_qwen2
    dtype, attention = _expected_choice([torch.device("cuda", 0), torch.device("cuda", 1)])
    cap = split_cap(path, dtype, attention)
    _clean()
    before = _allocated()
    model = load_safely(path, max_memory={0: cap, 1: cap})
    after = _allocated()
    report = placement_report(model)
    assert report.strategy == "split"
    assert {str(value) for value in model.hf_device_map.values()} <= {"0", "1", "cuda:0", "cuda:1"}
    assert len({str(value) for value in model.hf_device_map.values()}) == 2
    assert report.pinned_embeddings == ("model.embed_tokens",)
    predicted: list[int] = []
    for index in (0, 1):
        usage = report.usage(index)
        assert usage is not None
        assert usage.budget is not None
        assert usage.predicted_peak is not None
        assert usage.predicted_peak <= usage.budget
        predicted.append(usage.predicted_peak)
        grown = after[index] - before[index]
        assert usage.weights <= grown <= usage.weights + _ROUNDING * _tensor_count(model)
    # Inputs on the caller's device (the first GPU) work through the pinned embedding, and the
    # split model computes what the same weights compute on one GPU.
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        split_out = model.generate(ids.to("cuda:0"), max_new_tokens=8, do_sample=False)
        split_logits = model(ids.to("cuda:0")).logits.float().cpu()
    for index in (0, 1):
        assert torch.cuda.max_memory_allocated(index) - before[index] <= predicted[index]
    del model
    _clean()
    single = load_safely(path, device="cuda:0")
    with torch.no_grad():
        assert torch.equal(
            single.generate(ids.to("cuda:0"), max_new_tokens=8, do_sample=False).cpu(),
            split_out.cpu(),
        )
        torch.testing.assert_close(single(ids.to("cuda:0")).logits.float().cpu(), split_logits)
