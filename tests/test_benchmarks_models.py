"""The models the benchmarks and GPU tests build: ``benchmarks/_models.py`` and the predictions.

``materialize`` (random weights on a device map), ``workload_inputs`` (inputs with a workload's
tokens) and ``layer_split_map`` (a per-layer map) are in ``benchmarks/_models.py``;
``predict_phases`` (the memory model per phase) is in ``benchmarks/_memory.py``.
"""

from __future__ import annotations

import dataclasses
import doctest
import io
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing as ot

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from omnifix.testing import Family

AVAILABLE = ot.available_families()


def _skeleton(family: Family, **changes: Any) -> Any:
    """``family``'s tiny model on ``meta`` (buffers computed on the cpu, as from_pretrained)."""
    from accelerate import init_empty_weights

    config = ot.tiny_config(family)
    for key, value in changes.items():
        setattr(config, key, value)
    cls: Any = ot.model_class(family)
    with init_empty_weights():
        return cls(config)


def _qwen2_audio_expands_itself() -> bool:
    """transformers < 4.48: Qwen2-Audio takes one <|AUDIO|> per sample and expands it itself."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("4.48")


# --- the examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["_models", "_memory"])
def test_the_examples_run(benchmark_suite: Callable[[str], ModuleType], module: str) -> None:
    found = doctest.DocTestFinder().find(benchmark_suite(module))
    examples = [test for test in found if test.examples]
    assert examples
    runner = doctest.DocTestRunner()
    report = io.StringIO()
    for test in examples:
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


# --- materialize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", AVAILABLE)
def test_materialize_leaves_nothing_on_meta(bench_models: ModuleType, family: Family) -> None:
    import torch

    skeleton = _skeleton(family)
    device_map = bench_models.layer_split_map(skeleton, "cpu", "cpu")
    model = bench_models.materialize(skeleton, device_map)
    assert model is skeleton
    omnifix.assert_no_meta(model)
    floating = [p for p in model.parameters() if p.is_floating_point()]
    assert floating
    assert all(torch.isfinite(p).all() for p in floating)


def test_materialize_draws_from_the_seed_and_keeps_computed_buffers(
    bench_models: ModuleType,
) -> None:
    import torch

    first = bench_models.materialize(_skeleton("qwen2"), {"": "cpu"}, seed=3)
    again = bench_models.materialize(_skeleton("qwen2"), {"": "cpu"}, seed=3)
    other = bench_models.materialize(_skeleton("qwen2"), {"": "cpu"}, seed=4, std=0.5)
    weight = first.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(weight, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(weight, other.model.layers[0].mlp.up_proj.weight)
    assert float(weight.std()) == pytest.approx(0.02, rel=0.2)
    assert float(other.model.layers[0].mlp.up_proj.weight.detach().std()) == pytest.approx(
        0.5, rel=0.2
    )
    # The rotary table was computed while the model was built: moved, not redrawn.
    reference = ot.tiny_model("qwen2").model.rotary_emb.inv_freq
    assert torch.equal(first.model.rotary_emb.inv_freq, reference)


def test_materialize_keeps_tied_weights_tied(bench_models: ModuleType) -> None:
    skeleton = _skeleton("qwen2", tie_word_embeddings=True)
    model = bench_models.materialize(skeleton, bench_models.layer_split_map(skeleton, "cpu", "cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_materialize_refuses_disk_and_a_map_that_misses_a_parameter(
    bench_models: ModuleType,
) -> None:
    with pytest.raises(omnifix.InvalidArgumentError, match="cannot place modules on 'disk'"):
        bench_models.materialize(_skeleton("qwen2"), {"model": "cpu", "lm_head": "disk"})
    with pytest.raises(omnifix.InvalidArgumentError, match=r"holds 'lm_head\.weight'"):
        bench_models.materialize(_skeleton("qwen2"), {"model": "cpu"})


# --- workload_inputs -----------------------------------------------------------------------------

#: Workloads whose tokens the tiny towers make exactly (0.32 s: the tiny Qwen2-Audio's 32 frames).
WORKLOADS: list[tuple[Family, omnifix.Workload]] = [
    ("qwen2", omnifix.Workload(text_tokens=8)),
    ("qwen2-vl", omnifix.Workload(text_tokens=8, image_tokens=4)),
    ("qwen2-vl", omnifix.Workload(text_tokens=4, video_seconds=2, video_tokens_per_second=4)),
    ("qwen2-audio", omnifix.Workload(text_tokens=8, audio_seconds=0.32)),
    ("qwen2.5-omni-thinker", omnifix.Workload(text_tokens=8, image_tokens=4, audio_seconds=0.32)),
]


@pytest.mark.parametrize(
    ("family", "workload"),
    [pytest.param(f, w, id=f"{f}-{w}") for f, w in WORKLOADS if f in AVAILABLE],
)
def test_workload_inputs_hold_the_workloads_tokens_and_run(
    bench_models: ModuleType, family: Family, workload: omnifix.Workload
) -> None:
    import torch

    model = ot.tiny_model(family)
    wide = dataclasses.replace(workload, batch_size=2)
    inputs = bench_models.workload_inputs(model, wide)
    ids = inputs["input_ids"]
    old_audio = family == "qwen2-audio" and _qwen2_audio_expands_itself()
    expected = workload.prompt_tokens - (workload.audio_tokens - 1 if old_audio else 0)
    assert ids.shape == (2, expected)
    assert torch.equal(inputs["attention_mask"], torch.ones_like(ids))
    again = bench_models.workload_inputs(model, wide)
    assert all(torch.equal(inputs[key], again[key]) for key in inputs)  # seeded
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == (2, workload.prompt_tokens)
    assert torch.isfinite(logits).all()


def test_workload_inputs_go_to_the_device_asked_for(bench_models: ModuleType) -> None:
    import torch

    model = ot.tiny_model("qwen2-vl")
    work = omnifix.Workload(text_tokens=4, image_tokens=4)
    for device in (None, "cpu", torch.device("cpu")):
        inputs = bench_models.workload_inputs(model, work, device=device)
        assert {tensor.device for tensor in inputs.values()} == {torch.device("cpu")}


def test_workload_inputs_refuse_what_the_model_cannot_take(bench_models: ModuleType) -> None:
    with pytest.raises(
        omnifix.UnsupportedModelError, match="has none of image_token_id, image_token_index"
    ):
        bench_models.workload_inputs(
            ot.tiny_model("qwen2-audio"), omnifix.Workload(text_tokens=4, image_tokens=4)
        )
    with pytest.raises(omnifix.InvalidArgumentError, match=r"at most 0\.32 s of audio"):
        bench_models.workload_inputs(
            ot.tiny_model("qwen2-audio"), omnifix.Workload(text_tokens=4, audio_seconds=1)
        )


# --- layer_split_map -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", AVAILABLE)
def test_layer_split_map_places_every_parameter_once_in_two_halves(
    bench_models: ModuleType, family: Family
) -> None:
    model = ot.tiny_model(family)
    device_map = bench_models.layer_split_map(model, "first", "second")
    for name, _ in model.named_parameters():
        covering = [key for key in device_map if name.startswith(key + ".")]
        assert len(covering) == 1, name
    layers = [key for key in device_map if key.split(".")[-1].isdigit()]
    assert [device_map[key] for key in layers].count("first") == len(layers) // 2
    lm_heads = [key for key in device_map if key.endswith("lm_head")]
    assert lm_heads
    assert {device_map[key] for key in lm_heads} == {"second"}
    towers = [key for key in device_map if key.endswith(("visual", "audio_tower", "token2wav"))]
    assert {device_map[key] for key in towers} <= {"first"}
