"""benchmarks/overhead.py end to end in tiny mode: every family x configuration, on the cpu."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType


def _families(suite: ModuleType) -> list[str]:
    import omnifix.testing as ot

    available = set(ot.available_families())
    return [preset for preset, tiny in suite.FAMILIES.items() if tiny in available]


def test_tiny_run_records_every_configuration_of_every_family(
    benchmark_suite: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    suite = benchmark_suite("overhead")
    families = _families(suite)
    out = tmp_path / "overhead.json"
    argv = ["--tiny", "--rounds", "2", "--families", ",".join(families), "--out", str(out)]
    assert suite.main(argv) == 0

    payload = json.loads(out.read_text())
    assert payload["suite"] == "overhead"
    assert "torch" in payload["machine"]
    assert "ms/token" in payload["method"]
    cases = {(case["family"], case["config"]): case for case in payload["cases"]}
    assert set(cases) == {(family, c.key) for family in families for c in suite.CONFIGS}
    for (family, key), case in cases.items():
        assert case["status"] == "ok", (family, key, case["status"])
        assert case["ms_per_token"]["n"] == 2
        assert case["tokens_match_a"] is True, (family, key)
        config = next(c for c in suite.CONFIGS if c.key == key)
        if config.hooks == "accelerate":
            assert case["hooks"] > 0
        else:  # no hooks, or lean hooks on one device (both "GPUs" are the cpu here)
            assert case["hooks"] == 0
        if key == "a":
            assert case["ratio_to_a"] == 1.0
        assert case["ratio_to_a"] is not None
    # The balanced map really splits (two "GPUs"), and the per-layer map has its entries.
    for family in families:
        balanced = cases[(family, "d")]["map_summary"]
        assert balanced["boundaries"] >= 1
        per_layer = cases[(family, "b")]["map_summary"]["entries"]
        assert sum(per_layer.values()) == sum(balanced["entries"].values())


def test_a_failing_configuration_is_recorded_and_the_others_still_run(
    benchmark_suite: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    suite = benchmark_suite("overhead")
    import omnifix

    def refuse(*_: object, **__: object) -> None:
        raise omnifix.InvalidArgumentError("refused for the test. Fix: none.")

    monkeypatch.setattr(omnifix, "lean_dispatch", refuse)
    out = tmp_path / "overhead.json"
    family = _families(suite)[0]
    assert suite.main(["--tiny", "--rounds", "1", "--families", family, "--out", str(out)]) == 0

    cases = {case["config"]: case for case in json.loads(out.read_text())["cases"]}
    for key in ("c", "f", "g"):  # the lean configurations
        assert cases[key]["status"].startswith("error: InvalidArgumentError: refused"), cases[key]
    for key in ("a", "b", "d", "e"):
        assert cases[key]["status"] == "ok"


def test_unknown_family_is_refused(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    suite = benchmark_suite("overhead")
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--families", "qwen9-13b", "--out", str(tmp_path / "x.json")])
