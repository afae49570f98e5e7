"""benchmarks/accuracy.py: the cases cover every axis, the anchors, and a tiny run of every case."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType


@pytest.fixture(scope="module")
def suite(benchmark_suite: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_suite("accuracy")


def test_cases_cover_every_axis(suite: ModuleType) -> None:
    cases = suite.CASES
    assert len(cases) >= 28
    assert len(set(cases)) == len(cases)
    assert {work for _, work, _, _ in cases} == set(suite.WORKLOADS)
    assert {model for model, _, _, _ in cases} == set(suite.MODELS)
    for gpus in (1, 2):
        assert {attn for _, _, attn, n in cases if n == gpus} == {"sdpa", "eager"}
        assert {model for model, _, _, n in cases if n == gpus} == set(suite.MODELS)
    whole_omni = [c for c in cases if suite.MODELS[c[0]] == ("qwen2.5-omni-7b", "model")]
    assert len(whole_omni) >= 2


def test_summary_takes_median_and_worst_error_and_counts_fit_but_oom(suite: ModuleType) -> None:
    def row(error: float) -> dict[str, float]:
        return {
            "error": error,
            "error_with_margin": error + 0.01,
            "weights_only_error": -0.5,
            "weights_kv_error": -0.4,
        }

    cases = [
        {"status": "ok", "predicted_fits": True, "gpus": {"cuda:0": row(0.02)}},
        {
            "status": "ok",
            "predicted_fits": True,
            "gpus": {"cuda:0": row(-0.1), "cuda:1": row(0.04)},
        },
        {"status": "oom: CUDA out of memory", "predicted_fits": True, "gpus": {"cuda:0": row(9.0)}},
        {"status": "predicted not to fit", "predicted_fits": False},
    ]
    summary = suite.summarize(cases)
    assert summary["omnifix"] == {"gpus": 3, "median_abs_error": 0.04, "worst_error": -0.1}
    assert summary["weights_only"]["median_abs_error"] == 0.5
    assert summary["predicted_to_fit_but_oom"] == 1
    assert summary["predicted_not_to_fit"] == 1


def test_anchors_come_from_the_map_and_the_config(
    benchmark_suite: Callable[[str], ModuleType],
) -> None:
    import omnifix.testing as ot

    mem = benchmark_suite("_memory")

    model = ot.tiny_model("qwen2-audio")
    layers = mem.decoder_layers(model)
    assert len(layers) == 4
    assert all("audio_tower" not in name for name in layers)
    split = {"": 0, layers[2]: 1, layers[3]: 1, "lm_head": 1}
    weights = mem.weights_by_device(model, split)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    assert sum(weights.values()) == total
    assert weights["cuda:1"] == sum(
        t.numel() * t.element_size()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name.startswith((layers[2] + ".", layers[3] + ".", "lm_head."))
    )
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    assert mem.kv_bytes_per_token(model, 2) == per_token
    kv = mem.kv_by_device(model, split, tokens=10, dtype_bytes=2)
    assert kv == {"cuda:0": 2 * 10 * per_token, "cuda:1": 2 * 10 * per_token}


@pytest.mark.slow  # 10-30 s: 34 cases, 16 tiny model builds
def test_tiny_run_records_every_case(suite: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "accuracy.json"
    assert suite.main(["--tiny", "--new-tokens", "2", "--out", str(out)]) == 0

    payload = json.loads(out.read_text())
    assert payload["suite"] == "accuracy"
    assert "torch" in payload["machine"]
    assert "set_per_process_memory_fraction" in payload["method"]
    expected = {suite.case_key(*case) for case in suite.selected_cases(tiny=True)}
    cases = {case["case"]: case for case in payload["cases"]}
    assert set(cases) == expected
    for key, case in cases.items():
        assert case["status"] == "ok", (key, case["status"])
        assert case["predicted_fits"]
        assert case["strategy"] == ("split" if case["n_gpus"] == 2 else "single"), key
        assert sorted(case["gpus"]) == [f"cuda:{i}" for i in range(case["n_gpus"])], key
        for row in case["gpus"].values():
            assert row["measured"] is None  # nothing is measured on the cpu
            assert row["predicted_with_margin"] >= row["predicted"] > 0
            assert row["weights_kv"] >= row["weights_only"] > 0
        if case["n_gpus"] == 2:
            budgets = set(case["budgets"].values())
            assert len(budgets) == 1  # equal budgets
            assert case["budget_factor"] in suite.FACTORS
    summary = payload["summary"]
    assert summary["cases"] == len(expected)
    assert summary["predicted_to_fit_but_oom"] == 0
    assert summary["omnifix"]["gpus"] == 0
