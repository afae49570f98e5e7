"""benchmarks/capacity.py: the capacity search, the word maps, and a tiny run of every case."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType


@pytest.fixture(scope="module")
def suite(benchmark_suite: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_suite("capacity")


@given(
    threshold=st.integers(0, 5000),
    start=st.integers(1, 5000),
    lowest=st.integers(1, 50),
    highest=st.integers(50, 4000),
)
def test_search_finds_the_largest_size_that_runs_within_the_resolution(
    suite: ModuleType, threshold: int, start: int, lowest: int, highest: int
) -> None:
    tried: list[int] = []

    def runs(size: int) -> bool:
        assert lowest <= size <= highest
        tried.append(size)
        return size <= threshold

    found = suite.largest(runs, start=start, lowest=lowest, highest=highest, resolution=0.03)
    if threshold < lowest:
        assert found is None
    elif threshold >= highest:
        assert found == highest
    else:
        assert found is not None
        assert found <= threshold
        assert threshold - found <= max(1, 0.03 * found)
    assert len(tried) <= 2 * 13 + 8  # doubling/halving over 2**12, then bisection to 3 %


def test_word_maps_are_what_transformers_computes_for_two_small_cards(
    benchmark_suite: Callable[[str], ModuleType], suite: ModuleType
) -> None:
    mem = benchmark_suite("_memory")

    model = mem.skeleton("qwen2-audio-7b", tiny=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    # Cards of 1.5x the model: "auto"/"balanced" split it in two, balanced_low_0 spares GPU 0.
    memory: dict[int | str, int] = {0: 3 * size // 2, 1: 3 * size // 2, "cpu": 10 * size}
    found = {word: suite.word_map(model, word, memory) for word in suite.WORDS}
    if any(source == suite.CPU_STAND_IN for _, source in found.values()):
        pytest.skip("this accelerate cannot balance GPU maps on a machine without a GPU")
    assert all(source.startswith(("transformers", "accelerate")) for _, source in found.values())
    maps = {word: device_map for word, (device_map, _) in found.items()}
    assert maps["auto"] == maps["balanced"]  # device_map="auto" is "balanced" in transformers
    weights = {word: mem.weights_by_device(model, m) for word, m in maps.items()}
    assert set(weights["balanced"]) == {"cuda:0", "cuda:1"}
    assert "cpu" not in weights["balanced_low_0"]
    assert weights["balanced_low_0"].get("cuda:0", 0) < weights["balanced"]["cuda:0"]


def test_tiny_run_records_every_kind_and_placement(suite: ModuleType, tmp_path: Path) -> None:
    import omnifix.testing as ot

    out = tmp_path / "capacity.json"
    assert suite.main(["--tiny", "--new-tokens", "2", "--out", str(out)]) == 0

    payload = json.loads(out.read_text())
    assert payload["suite"] == "capacity"
    assert "24 GiB" in payload["method"]
    has_vl = "qwen2-vl" in ot.available_families()
    kinds = [k for k, kind in suite.KINDS.items() if has_vl or "vl" not in kind.preset]
    cases = {case["case"]: case for case in payload["cases"]}
    assert set(cases) == {f"{kind}/{place}" for kind in kinds for place in suite.PLACEMENTS}
    for key, case in cases.items():
        kind = suite.KINDS[case["kind"]]
        assert case["status"] == "ok", (key, case["status"])
        # Nothing runs out of memory on the cpu: every search ends at its bound.
        assert case["capacity"] == kind.tiny_highest, key
        assert case["at_bound"]
        if case["placement"] == "omnifix":
            assert case["plan_capacity"] == kind.tiny_highest
            assert case["prediction_failures"] == []
        elif "reused_from" not in case:
            sizes = [probe["size"] for probe in case["probes"]]
            # The first word's search starts at the kind's start, later ones at its capacity.
            first = case["placement"] == "auto"
            assert sizes[0] == (kind.tiny_start if first else kind.tiny_highest), key
            assert all(probe["status"] == "ok" for probe in case["probes"])
    for kind in kinds:
        if cases[f"{kind}/balanced"]["device_map"] == cases[f"{kind}/auto"]["device_map"]:
            assert cases[f"{kind}/balanced"]["reused_from"] == f"{kind}/auto"
        assert payload["summary"][kind]["omnifix_over_auto"] == 1.0
