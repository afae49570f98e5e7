"""The CUDA caching allocator in the plan; load_safely's allocator switch and post-load check."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

import omnifix
import omnifix.testing as ot
from omnifix import Workload, plan_placement
from omnifix._plan.budgets import Allocator, allocator_settings, enable_expandable_segments
from omnifix._plan.estimate import CALIBRATION

if TYPE_CHECKING:
    from pathlib import Path

SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value", "expandable", "backend"),
    [
        ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", True, "native"),
        (
            "PYTORCH_CUDA_ALLOC_CONF",
            "max_split_size_mb:128, expandable_segments:True",
            True,
            "native",
        ),
        ("PYTORCH_ALLOC_CONF", "expandable_segments:False", False, "native"),
        ("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync", False, "cudaMallocAsync"),
    ],
)
def test_allocator_settings_are_read_as_torch_reads_them(
    no_settings: pytest.MonkeyPatch, name: str, value: str, expandable: bool, backend: str
) -> None:
    no_settings.setenv(name, value)
    settings = allocator_settings()
    assert (settings.expandable_segments, settings.backend) == (expandable, backend)
    assert settings.source == "environment"


def test_the_newer_variable_wins(no_settings: pytest.MonkeyPatch) -> None:
    no_settings.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    no_settings.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    assert not allocator_settings().expandable_segments


def test_no_settings_is_the_default_allocator(no_settings: pytest.MonkeyPatch) -> None:
    assert allocator_settings() == Allocator()


def test_expandable_segments_shrink_what_the_plan_reserves(no_settings: pytest.MonkeyPatch) -> None:
    work = Workload(text_tokens=8192)
    default = plan_placement("qwen2-vl-7b", budgets={0: "80GiB"}, workload=work).devices[0]
    no_settings.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = plan_placement("qwen2-vl-7b", budgets={0: "80GiB"}, workload=work)
    expandable = result.devices[0]
    allocated = expandable.weights + expandable.kv_cache + expandable.activations
    assert expandable.allocator == int(CALIBRATION.reserved_gap_expandable * allocated)
    assert expandable.allocator < default.allocator
    assert expandable.total < default.total
    assert any("expandable segments" in note for note in result.notes)


def test_gpu_totals_are_reserved_peaks() -> None:
    row = plan_placement("qwen2-vl-7b", budgets={0: "80GiB"}).devices[0]
    assert row.allocator > 0
    assert row.total == row.weights + row.kv_cache + row.activations + row.allocator + row.overhead


def test_cpu_rows_reserve_nothing_for_the_cuda_allocator() -> None:
    row = plan_placement("qwen2-vl-7b", budgets={"cpu": "80GiB"}).devices[0]
    assert row.allocator == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_expandable_segments_are_left_alone_without_cuda(no_settings: pytest.MonkeyPatch) -> None:
    assert not enable_expandable_segments()
    assert allocator_settings() == Allocator()


def test_the_callers_allocator_settings_are_kept(no_settings: pytest.MonkeyPatch) -> None:
    no_settings.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert not enable_expandable_segments()
    assert allocator_settings().expandable_segments is False


def test_verify_workload_runs_the_declared_workload_once_on_the_cpu(tmp_path: Path) -> None:
    work = Workload(text_tokens=24, max_new_tokens=3)
    model = omnifix.load_safely(
        ot.save_tiny_model("qwen2", tmp_path), device="cpu", workload=work, verify_workload=True
    )
    assert not model.training


def test_verify_workload_needs_a_plan(tmp_path: Path) -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="verify_workload"):
        omnifix.load_safely(
            ot.save_tiny_model("qwen2", tmp_path), device_map={"": "cpu"}, verify_workload=True
        )


def test_insufficient_memory_error_carries_the_measured_peaks() -> None:
    error = omnifix.InsufficientMemoryError("short", measured={"cuda:0": 5})
    assert error.measured == {"cuda:0": 5}
    assert omnifix.InsufficientMemoryError("short").measured == {}
