"""``patch_from_pretrained()``: real tiny models, real ``from_pretrained``."""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

import omnifix
import omnifix.testing as ot
from omnifix import patch_from_pretrained

if TYPE_CHECKING:
    import pathlib

FAMILIES = ot.available_families()
#: A cpu cap well under the tiny models' weights: plain transformers offloads to disk.
TINY_CAP = {"cpu": "20KiB"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("patch")
    return {family: ot.save_tiny_model(family, root / family) for family in FAMILIES}


def _original() -> Any:
    return PreTrainedModel.__dict__["from_pretrained"]


def _same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_call_unchanged(family: str, saved: dict[str, pathlib.Path]) -> None:
    cls = ot.model_class(family)  # type: ignore[arg-type]
    plain = cls.from_pretrained(saved[family])
    with patch_from_pretrained():
        wrapped = cls.from_pretrained(saved[family])
    assert type(wrapped) is type(plain)
    assert wrapped.dtype == plain.dtype
    assert _same_weights(wrapped, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_map_with_small_cap_is_refused_instead_of_disk_offload(
    family: str, saved: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    cls = ot.model_class(family)  # type: ignore[arg-type]
    original = _original()
    with patch_from_pretrained(), pytest.raises(omnifix.InsufficientMemoryError, match="short"):
        cls.from_pretrained(
            saved[family], device_map="auto", max_memory=TINY_CAP, offload_folder=tmp_path / "o2"
        )
    assert _original() is original


def test_plain_transformers_offloads_to_disk_silently(
    saved: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """What the patch replaces: offload to disk without a word (4.x fails on disk instead)."""
    kwargs: dict[str, Any] = {"device_map": "auto", "max_memory": TINY_CAP}
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(Exception, match="disk"):
            AutoModelForCausalLM.from_pretrained(saved["qwen2"], offload_folder=tmp_path, **kwargs)
        return
    plain = AutoModelForCausalLM.from_pretrained(saved["qwen2"], offload_folder=tmp_path, **kwargs)
    assert "disk" in omnifix.placement_report(plain).offloaded


def test_auto_class_is_routed_and_planned(saved: dict[str, pathlib.Path]) -> None:
    with patch_from_pretrained(workload=omnifix.Workload(text_tokens=64, max_new_tokens=8)):
        model = AutoModelForCausalLM.from_pretrained(saved["qwen2"], device_map="balanced")
        with pytest.raises(omnifix.InsufficientMemoryError):
            AutoModelForCausalLM.from_pretrained(
                saved["qwen2"], device_map="auto", max_memory=TINY_CAP
            )
    report = omnifix.placement_report(model)
    assert report.planned
    assert report.strategy == "single"
    assert [usage.device for usage in report.devices] == ["cpu"]


def test_dtype_of_the_plain_call_is_kept(saved: dict[str, pathlib.Path]) -> None:
    with patch_from_pretrained():
        model = AutoModelForCausalLM.from_pretrained(
            saved["qwen2"], device_map="auto", torch_dtype=torch.bfloat16
        )
    assert model.dtype == torch.bfloat16


def test_devices_are_normalised(saved: dict[str, pathlib.Path]) -> None:
    with patch_from_pretrained():
        model = AutoModelForCausalLM.from_pretrained(saved["qwen2"], device_map=torch.device("cpu"))
        assert model.device == torch.device("cpu")
        assert omnifix.find_meta_tensors(model).uninitialised == ()
        with pytest.raises(omnifix.DeviceUnavailableError):
            AutoModelForCausalLM.from_pretrained(saved["qwen2"], device_map="cuda:1")


def test_explicit_offload_map_needs_allow_offload(
    saved: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    names = [
        name for name, _ in AutoModelForCausalLM.from_pretrained(saved["qwen2"]).named_children()
    ]
    assert names == ["model", "lm_head"]
    device_map = {"model": "cpu", "lm_head": "disk"}
    with (
        patch_from_pretrained(),
        pytest.raises(omnifix.InvalidArgumentError, match="allow_offload=True"),
    ):
        AutoModelForCausalLM.from_pretrained(saved["qwen2"], device_map=device_map)
    with patch_from_pretrained(allow_offload=True):
        model = AutoModelForCausalLM.from_pretrained(
            saved["qwen2"], device_map=device_map, offload_folder=tmp_path
        )
    assert omnifix.placement_report(model).offloaded


def test_signature_and_identity_restored(saved: dict[str, pathlib.Path]) -> None:
    original = _original()
    signature = inspect.signature(PreTrainedModel.from_pretrained)
    with patch_from_pretrained():
        assert _original() is not original
        assert inspect.signature(PreTrainedModel.from_pretrained) == signature
        assert PreTrainedModel.from_pretrained.__name__ == "from_pretrained"
        assert PreTrainedModel.from_pretrained.__doc__ == original.__func__.__doc__
    assert _original() is original


def _boom() -> None:
    raise KeyError("boom")


def test_exception_inside_restores() -> None:
    original = _original()
    with pytest.raises(KeyError), patch_from_pretrained():
        _boom()
    assert _original() is original


def test_nesting_and_repeated_use() -> None:
    original = _original()
    with patch_from_pretrained(allow_offload=True) as outer:
        patched_attribute = _original()
        with patch_from_pretrained() as inner:
            assert _original() is patched_attribute  # patched once, not wrapped twice
            assert inner.active
            assert outer.active
        assert (inner.active, outer.active) == (False, True)
        assert _original() is patched_attribute
    assert _original() is original
    with patch_from_pretrained():
        assert _original() is not original
    assert _original() is original


def test_patches_removed_out_of_order_restore_the_original_once() -> None:
    original = _original()
    first = patch_from_pretrained()
    second = patch_from_pretrained(strict=True)
    first.remove()  # out of order: the second still holds the patch
    first.remove()  # idempotent
    assert _original() is not original
    assert (first.active, second.active) == (False, True)
    second.remove()
    assert _original() is original
    with patch_from_pretrained() as patch:
        assert _original() is not original
    assert not patch.active
    assert _original() is original


def test_old_spellings_warn_and_still_work() -> None:
    original = _original()
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning, match="patch_from_pretrained"):
        patch = omnifix.install()
    assert _original() is not original
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning, match="remove"):
        patch.restore()
    assert not patch.active
    assert _original() is original
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning):
        omnifix.install()
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning):
        assert omnifix.uninstall() is True
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning):
        assert omnifix.uninstall() is False
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning):
        block = omnifix.patched()
    with block as patch:
        assert patch.active
        assert _original() is not original
    assert _original() is original
    with pytest.warns(omnifix.errors.OmnifixDeprecationWarning, match="FromPretrainedPatch"):
        assert omnifix.Patch is omnifix.types.FromPretrainedPatch


def test_threads_share_one_patch() -> None:
    original = _original()
    barrier = threading.Barrier(4)
    seen: list[bool] = []

    def work() -> None:
        with patch_from_pretrained():
            barrier.wait()
            seen.append(_original() is not original)
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [True] * 4
    assert _original() is original


def test_bad_workload() -> None:
    bad: Any = "big"
    original = _original()
    with pytest.raises(omnifix.InvalidArgumentError):
        patch_from_pretrained(workload=bad)
    assert _original() is original
