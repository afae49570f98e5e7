"""benchmarks/timing.py end to end in tiny mode: plan, checks and load parts, on the cpu."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType

    import pytest


def _run(
    load: Callable[[str], ModuleType], tmp_path: Path, only: str
) -> tuple[ModuleType, dict[str, dict]]:
    suite = load("timing")
    out = tmp_path / "timing.json"
    argv = ["--tiny", "--only", only, "--out", str(out), "--workdir", str(tmp_path)]
    assert suite.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["suite"] == "timing"
    assert "torch" in payload["machine"]
    assert list(tmp_path.iterdir()) == [out]  # the temporary checkpoints are gone
    return suite, {case["case"]: case for case in payload["cases"]}


def test_plan_part_times_a_cold_subprocess_and_warm_calls(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    suite, cases = _run(benchmark_suite, tmp_path, "plan")
    name = f"plan tiny {suite.tiny_family(suite.TINY_PLAN)} 24GiBx2"
    assert list(cases) == [name]
    case = cases[name]
    assert case["status"] == "ok"
    assert case["strategy"] == "single"
    for key in ("cold_ms", "import_ms", "cold_class_imported_ms", "import_with_class_ms"):
        assert case[key] > 0, key
    assert case["warm_ms"]["n"] == case["warm_uncached_ms"]["n"] == 3


def test_checks_part_times_every_check_on_meta_and_on_a_device(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    suite, cases = _run(benchmark_suite, tmp_path, "checks")
    label = f"checks tiny {suite.tiny_family(suite.TINY_CHECKS)}"
    meta = cases[f"{label} meta (cpu)"]
    placed = cases[f"{label} cpu"]
    assert meta["status"] == placed["status"] == "ok"
    names = {"assert_no_meta", "input_device", "find_meta_tensors", "placement_report"}
    assert set(meta["ms"]) == set(placed["ms"]) == names | {"all"}
    # The meta skeleton fails the check, the same model given storage passes it.
    assert meta["outcome"]["assert_no_meta"] == "raised MetaTensorError"
    assert placed["outcome"]["assert_no_meta"] == "passed"
    assert placed["outcome"]["input_device"] == "cpu"
    assert placed["outcome"]["find_meta_tensors"] == "0 meta tensors"
    assert meta["parameters"] == placed["parameters"] > 0
    # The split cases run the same code; on the cpu the plan keeps one device, so lean adds none.
    for hooks in ("accelerate", "lean"):
        split = cases[f"{label} split {hooks}"]
        assert split["status"] == "ok", split["status"]
        assert split["outcome"]["assert_no_meta"] == "passed"
    assert cases[f"{label} split lean"]["hooks"] == 0


def test_load_part_alternates_load_safely_and_from_pretrained(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    _, cases = _run(benchmark_suite, tmp_path, "load")
    assert cases["load save checkpoint"]["status"] == "ok"
    assert cases["load save checkpoint"]["checkpoint_bytes"] > 0
    loads = [case for name, case in cases.items() if name.startswith("load cpu")]
    assert loads
    for case in loads:
        assert case["status"] == "ok", case["status"]
        assert case["devices"] == ["cpu"]
        assert case["load_safely_s"]["n"] == case["from_pretrained_s"]["n"] == 2
        assert len(case["ratios"]) == 2
        assert case["median_ratio"] > 0


def test_a_failing_case_is_recorded_and_the_run_goes_on(
    benchmark_suite: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import omnifix

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("broken for the test")

    monkeypatch.setattr(omnifix, "placement_report", broken)
    _, cases = _run(benchmark_suite, tmp_path, "checks")
    assert len(cases) == 4
    for case in cases.values():
        assert case["status"] == "error: RuntimeError: broken for the test"


def test_error_status_records_out_of_memory_and_empty_messages(
    benchmark_suite: Callable[[str], ModuleType],
) -> None:
    import torch

    results = benchmark_suite("_results")
    assert results.error_status(torch.OutOfMemoryError("CUDA out of memory.\nmore")) == (
        "oom: CUDA out of memory."
    )
    assert results.error_status(RuntimeError("")) == "error: RuntimeError: "
    assert results.error_status(ValueError("x" * 400)) == "error: ValueError: " + "x" * 300
