"""benchmarks/tight_budget.py end to end in tiny mode: plan at the edge, build, generate, record."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import transformers

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType


def _has(name: str) -> bool:
    return hasattr(transformers, name)


def test_tiny_run_plans_builds_and_generates_every_case_and_records_both_sets(
    benchmark_suite: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    suite = benchmark_suite("tight_budget")
    out = tmp_path / "tight.json"
    assert suite.main(["--tiny", "--only", "gpt2,flan-t5,qwen3-30b", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == "tight_budget"
    cases = [case for case in result["cases"] if not case["outcome"].startswith("skipped")]
    expected = {"gpt2", "flan-t5-large"} | ({"qwen3-30b-a3b"} if _has("Qwen3MoeConfig") else set())
    assert {case["preset"] for case in cases} == expected
    for case in cases:
        assert case["accepted"], case
        assert case["outcome"] == "ok", case
        assert case["budget"] >= case["predicted"] + case["margin"]
    assert set(result["summary"]) == {"fit", "validation"}
    assert result["summary"]["validation"]["oom"] == 0


def test_the_fit_and_validation_sets_are_apart(
    benchmark_suite: Callable[[str], ModuleType],
) -> None:
    suite = benchmark_suite("tight_budget")
    fit = {case.preset for case in suite.CASES if case.group == "fit"}
    validation = {case.preset for case in suite.CASES if case.group == "validation"}
    assert not fit & validation
    assert all(preset.startswith(("qwen2-", "qwen2.5-")) for preset in fit)
    assert len(validation) >= 8
    assert any(case.attn == "eager" for case in suite.CASES if case.group == "validation")
    assert any(case.work.get("batch_size", 1) > 1 for case in suite.CASES)


def test_set_attention_reaches_the_configs_an_encoder_and_a_decoder_copy(
    bench_memory: ModuleType,
) -> None:
    # T5 hands its encoder and decoder copies of the config; transformers 5.17's
    # set_attn_implementation left them on sdpa, so a case labelled eager ran sdpa.
    config = transformers.T5Config(d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=1)
    model = transformers.T5ForConditionalGeneration(config)
    bench_memory.set_attention(model, "eager")
    implementations = {
        module.config._attn_implementation  # what each module will run
        for module in model.modules()
        if hasattr(module, "config")
    }
    assert implementations == {"eager"}
