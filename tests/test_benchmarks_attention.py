"""benchmarks/attention.py end to end in tiny mode: every model x attention x batch x prompt."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType


def test_tiny_run_records_every_case_with_times_and_agreement(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    suite = benchmark_suite("attention")
    out = tmp_path / "attention.json"
    argv = ["--tiny", "--rounds", "1", "--batches", "1,2", "--prompts", "8", "--out", str(out)]
    assert suite.main(argv) == 0

    payload = json.loads(out.read_text())
    assert payload["suite"] == "attention"
    assert "decode_ms_per_token" in payload["method"]
    cases = payload["cases"]
    models = {case["model"] for case in cases}
    assert "text" in models
    assert {case["attention"] for case in cases} == {"sdpa", "eager"}  # no flash-attn on the cpu
    keys = {(c["model"], c["attention"], c["batch"]) for c in cases}
    assert len(keys) == len(cases) == len(models) * 2 * 2
    for case in cases:
        assert case["status"] == "ok", case
        assert case["prefill_ms"] > 0
        assert case["input_tokens"] >= 8
        # Eager and sdpa compute the same attention: in float32 they agree to rounding.
        assert case["logits_vs_sdpa"] < 1e-4, case
    assert set(payload["summary"]) == {f"{model}/eager" for model in models}
