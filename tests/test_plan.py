"""The placement planner, on CPU: full-size presets on meta with simulated GPU budgets.

What the numbers are checked against:

* the memory model against GPU measurements (``CALIBRATION.figures``: Qwen2.5-VL-7B on an H100,
  transformers 5.17), each within 10 %;
* the weights against the published checkpoint size (Qwen2.5-Omni-7B's safetensors index,
  22,366,403,936 bytes, bf16 with token2wav in fp32);
* maps and budgets against the plan's own invariants: every device within its budget, every
  parameter placed exactly once, contiguous blocks, lm_head after the last layer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

import omnifix
import omnifix.testing as ot
from omnifix import PlacementPlan, Workload, plan_placement
from omnifix._compat import transformers_version
from omnifix._device_map import Placement
from omnifix._plan.anatomy import describe
from omnifix._plan.budgets import resolve_budgets
from omnifix._plan.estimate import CALIBRATION, estimate
from omnifix._plan.presets import PRESETS, preset_config, preset_model_class
from omnifix._plan.skeleton import build_on_meta, build_skeleton, load_skeleton
from omnifix._plan.strategies import Attempt, Request, evaluate
from omnifix._units import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path
    from types import ModuleType

    #: ``predict_phases(model, *, workload, ...)`` of ``benchmarks/_memory.py``.
    PredictPhases = Callable[..., dict[str, int]]

GIB = 2**30
#: Qwen/Qwen2.5-Omni-7B model.safetensors.index.json total_size (revision ae9e169).
OMNI_7B_CHECKPOINT_BYTES = 22_366_403_936


@pytest.fixture(autouse=True)
def _default_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan for the default CUDA allocator, as the measured figures and OOMs below ran."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


@cache
def _available(preset: str) -> bool:
    try:
        preset_model_class(preset)
    except omnifix.UnsupportedModelError:
        return False
    return True


def needs(preset: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _available(preset), reason=f"{preset} needs newer transformers")


#: A Qwen2-VL-family 7B that every stack has (Qwen2.5-VL needs 4.49).
VL_7B = "qwen2.5-vl-7b" if _available("qwen2.5-vl-7b") else "qwen2-vl-7b"
#: A model too big for one card, and that card's size in GiB (Qwen2.5-Omni needs 4.52).
BIG, CARD = ("qwen2.5-omni-7b", 16) if _available("qwen2.5-omni-7b") else ("qwen2-audio-7b", 12)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[-1]) if parts[-2:-1] == ["layers"] and parts[-1].isdigit() else None


def _covering_entries(plan: PlacementPlan, parameter: str) -> list[str]:
    return [
        key for key in plan.device_map if key in ("", parameter) or parameter.startswith(key + ".")
    ]


def assert_sound(plan: PlacementPlan, model: torch.nn.Module) -> None:
    """The invariants of a plan that fits: budgets kept, every parameter placed exactly once."""
    assert plan.fits
    for row in plan.devices:
        assert row.total + row.margin <= row.budget, row
        assert row.margin >= CALIBRATION.margin_bytes or row.weights == 0
    for name, _ in model.named_parameters():
        assert len(_covering_entries(plan, name)) == 1, name
    placed = {row.device: row.weights for row in plan.devices}
    assert sum(placed.values()) == pytest.approx(
        sum(p.numel() * p.element_size() for p in model.parameters())
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        rel=1e-6,
    )


# --------------------------------------------------------------------------------------------
# The memory model against GPU measurements
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_phases(benchmark_suite: Callable[[str], ModuleType]) -> PredictPhases:
    """The memory model's peak per phase on one GPU, as ``benchmarks/measure_peaks.py`` measures."""
    predict: PredictPhases = benchmark_suite("_memory").predict_phases
    return predict


@pytest.mark.parametrize("figure", CALIBRATION.figures, ids=lambda f: f"{f.attn}-{f.phase}-{f.gib}")
def test_memory_model_reproduces_each_measured_peak_within_10_percent(
    figure: Any, predict_phases: PredictPhases
) -> None:
    preset = figure.preset
    if not _available(preset):
        if figure.phase != "prefill":
            pytest.skip(f"{preset}'s vision tower needs newer transformers")
        preset = "qwen2-vl-7b"  # the same language model as Qwen2.5-VL-7B
    usage = estimate(
        describe(_skeleton_of(preset)),
        execution_device=lambda _: "cuda:0",
        load=Workload(
            text_tokens=figure.text_tokens,
            image_tokens=figure.image_tokens,
            max_new_tokens=1,  # the measurements ran generate(max_new_tokens=1)
        ),
        dtype=torch.bfloat16,
        attn_implementation=figure.attn,
        include_inputs=False,  # the measurements' baseline held the inputs
    )
    phases = usage["cuda:0"].phases
    predicted = phases[figure.phase]
    if figure.first_case:  # its baseline did not hold the cuBLAS workspaces yet
        predicted += CALIBRATION.workspace
    assert predicted / GIB == pytest.approx(figure.gib, rel=0.10)


def _layouts_on_this_stack() -> dict[tuple[str, str], str]:
    """Tower attention layouts of the installed transformers, measured on the wheels 4.45-5.23.

    4.45-4.53: every packed (``cu_seqlens``) attention builds one mask over the whole call;
    4.54-4.57: the vision towers run one segment at a time, Qwen2.5-Omni's audio attention takes
    ``attention_mask`` (one mask); 5.x: one segment at a time everywhere. Qwen2-Audio pads clips
    to 30 s and attends over them in one batch on every release.
    """
    release = transformers_version()
    vision = "full_mask" if release < Version("4.54") else "chunked"
    omni_audio = "chunked" if release >= Version("5.0") else "full_mask"
    return {
        ("qwen2-vl-7b", "vision"): vision,
        ("qwen2.5-vl-3b", "vision"): vision,
        ("qwen2.5-vl-7b", "vision"): vision,
        ("qwen2.5-vl-72b", "vision"): vision,
        # Qwen3's towers ship from 4.57, where packed attention already runs per segment.
        ("qwen3-vl-235b-a22b", "vision"): "chunked",
        ("qwen3-omni-30b-a3b", "vision"): "chunked",
        ("qwen3-omni-30b-a3b", "audio"): omni_audio,
        ("qwen2.5-omni-3b", "vision"): vision,
        ("qwen2.5-omni-3b", "audio"): omni_audio,
        ("qwen2.5-omni-7b", "vision"): vision,
        ("qwen2.5-omni-7b", "audio"): omni_audio,
        ("qwen2-audio-7b", "audio"): "batched",
    }


@pytest.mark.parametrize("preset", sorted({name for name, _ in _layouts_on_this_stack()}))
def test_tower_attention_layouts_on_this_stack(preset: str) -> None:
    if not _available(preset):
        pytest.skip(f"{preset} needs newer transformers")
    towers = describe(_skeleton_of(preset)).towers
    expected = {
        kind: layout for (name, kind), layout in _layouts_on_this_stack().items() if name == preset
    }
    assert {tower.kind: tower.layout for tower in towers} == expected


# --------------------------------------------------------------------------------------------
# The budgets
# --------------------------------------------------------------------------------------------


@needs("qwen2.5-omni-7b")
def test_omni_7b_fits_one_24gib_card_with_fa2_and_needs_at_least_23gb() -> None:
    work = Workload(text_tokens=2048, max_new_tokens=256)
    plan = plan_placement(
        "qwen2.5-omni-7b",
        budgets={0: "24GiB"},
        attn_implementation="flash_attention_2",
        workload=work,
    )
    (card,) = plan.devices
    assert (plan.strategy, plan.device_map, plan.dtype) == (
        "single",
        {"": "cuda:0"},
        torch.bfloat16,
    )
    assert plan.input_device == torch.device("cuda", 0)
    # Thinker + talker + token2wav (fp32), as published, plus the buffers built with the model.
    assert OMNI_7B_CHECKPOINT_BYTES <= card.weights <= OMNI_7B_CHECKPOINT_BYTES + 32 * 2**20
    # The seeds' "Omni-7B needs >= 23 GB with FA2" holds for this workload ...
    assert card.total >= 23e9
    assert card.total + card.margin <= 24 * GIB
    # ... and a minute of video does not fit the same card.
    video = plan_placement(
        "qwen2.5-omni-7b",
        budgets={0: "24GiB"},
        attn_implementation="flash_attention_2",
        workload=Workload(text_tokens=2048, video_seconds=60),
    )
    assert video.strategy == "refuse"
    assert video.devices[0].total > 24 * GIB


def test_one_card_too_small_refuses_with_numbers_and_checked_options() -> None:
    # Qwen2.5-Omni-7B on one 16 GiB card (Qwen2-Audio-7B on 12 GiB where Omni is missing).
    plan = plan_placement(
        BIG, budgets={0: f"{CARD}GiB", "cpu": "64GiB"}, workload=Workload(text_tokens=2048)
    )
    assert not plan.fits
    assert plan.strategy == "refuse"
    card = plan.device("cuda:0")
    short = -card.headroom
    assert short > card.weights - CARD * GIB > 3 * GIB  # the weights alone are GiBs too many
    message = plan.explain()
    assert f"{format_bytes(short)} short" in message
    assert "cuda:0: needs" in message
    assert message.rstrip().splitlines()[-1].startswith("Fix:")
    kinds = {option.kind: option for option in plan.options}
    assert kinds["gpus"].description == f"2 GPUs of {CARD}.0 GiB"
    # 8 bits, or 4 where 8 are too many, as from_pretrained takes it.
    assert kinds["quantization"].load.startswith("quantization_config=transformers.BitsAndBytes")
    assert kinds["offload"].arguments == {"allow_offload": "True"}
    assert kinds["cpu"].load == "device='cpu', dtype=torch.float32"
    with pytest.raises(omnifix.InsufficientMemoryError, match="GiB short") as caught:
        plan.raise_if_refused()
    assert isinstance(caught.value, MemoryError)
    assert caught.value.plan is plan
    assert str(caught.value) == message
    # Each option was checked: re-planning with it fits.
    two = plan_placement(
        BIG, budgets={0: f"{CARD}GiB", 1: f"{CARD}GiB"}, workload=Workload(text_tokens=2048)
    )
    assert two.fits


@needs("qwen2.5-vl-7b")
def test_two_24gib_cards_split_with_the_tower_gpu_reserving_more() -> None:
    # Batch 4 no longer fits: the vision tower's 1.7 GiB MLP block is kept free (fresh_blocks).
    work = Workload(batch_size=3, text_tokens=512, image_tokens=16384)
    plan = plan_placement("qwen2.5-vl-7b", budgets={0: "24GiB", 1: "24GiB"}, workload=work)
    model = build_skeleton("qwen2.5-vl-7b")
    assert plan.strategy == "split"
    assert_sound(plan, model)
    tower, other = plan.devices
    assert plan.device_map["model.visual"] == "cuda:0"
    assert plan.device_map["lm_head"] == "cuda:1"
    assert plan.input_device == torch.device("cuda", 0)
    assert plan.boundaries == 1 == len(plan.devices_used) - 1
    # The tower GPU runs the vision encoder over 3 x 65536 patches: its reservation is larger.
    assert tower.phase == "vision"
    assert tower.activations > other.activations
    # Contiguous layers: all of cuda:0's come before all of cuda:1's.
    layers = [
        (index, device)
        for name, device in plan.device_map.items()
        if (index := _layer_index(name)) is not None
    ]
    devices_in_order = [device for _, device in sorted(layers)]
    assert devices_in_order == sorted(devices_in_order)


def test_two_12gib_cards_split_a_7b_vl_model() -> None:
    plan = plan_placement(VL_7B, budgets={0: "12GiB", 1: "12GiB"})
    assert plan.strategy == "split"
    assert_sound(plan, build_skeleton(VL_7B))
    assert plan.devices_used == ("cuda:0", "cuda:1")
    assert plan.boundaries == 1
    assert list(plan.device_map.values())[-1] == "cuda:1"  # lm_head, after the last layer
    assert plan.device_map["lm_head"] == "cuda:1"
    # Each GPU got layers, and its own KV cache with them.
    assert all(row.kv_cache > 0 for row in plan.devices)


@needs("qwen2.5-omni-7b")
def test_two_10gib_cards_refuse_omni_7b_and_suggest_a_third() -> None:
    plan = plan_placement("qwen2.5-omni-7b", budgets={0: "10GiB", 1: "10GiB"})
    assert plan.strategy == "refuse"
    assert any(option.description == "3 GPUs of 10.0 GiB" for option in plan.options)
    three = plan_placement("qwen2.5-omni-7b", budgets=dict.fromkeys(range(3), "10GiB"))
    assert three.fits
    assert three.boundaries == 2


@needs("qwen2.5-omni-7b")
def test_four_16gib_cards_use_as_few_as_needed() -> None:
    # 1024 text tokens: with 4096, cuda:0 also keeps the 3.5 GiB logits copy and a fresh block for
    # it, and the balancing pass's probes stay 30 % apart over three GPUs.
    work = Workload(text_tokens=1024, video_seconds=30, audio_seconds=30)
    plan = plan_placement(
        "qwen2.5-omni-7b", budgets=dict.fromkeys(range(4), "16GiB"), workload=work
    )
    assert plan.strategy == "split"
    assert_sound(plan, build_skeleton("qwen2.5-omni-7b"))
    used = plan.devices_used
    assert used == tuple(f"cuda:{i}" for i in range(len(used)))  # filled in order
    assert 2 <= len(used) < 4
    assert plan.boundaries == len(used) - 1
    # Balanced over the GPUs it needs, not spread over all four.
    assert _imbalance(_used_rows(plan)) <= _allowed_imbalance("qwen2.5-omni-7b", plan)
    for row in plan.devices:
        assert (row.weights == 0) == (row.device not in used)
        if row.weights == 0:
            assert row.total == row.margin == 0
    # The thinker's towers and embeddings are on the first GPU, its lm_head after its layers.
    assert plan.input_device == torch.device("cuda", 0)


def test_eager_attention_changes_the_verdict_for_long_video() -> None:
    work = Workload(text_tokens=512, video_seconds=60)
    budgets = {0: "40GiB"}
    sdpa = plan_placement(VL_7B, budgets=budgets, attn_implementation="sdpa", workload=work)
    eager = plan_placement(VL_7B, budgets=budgets, attn_implementation="eager", workload=work)
    assert sdpa.fits
    assert not eager.fits
    # 28 heads x 15872^2 scores of 10 bytes in the prefill: tens of GiB more (more still where
    # transformers 4.45's vision tower scores every pair of the video's 61440 patches).
    assert eager.devices[0].activations - sdpa.devices[0].activations > 50 * GIB
    assert eager.devices[0].phase in ("prefill", "video")
    assert any(option.arguments == {"attn_implementation": "'sdpa'"} for option in eager.options)


def test_allow_offload_turns_the_refusal_into_an_explicit_offload_map() -> None:
    budgets = {0: f"{CARD}GiB", "cpu": "64GiB"}
    work = Workload(text_tokens=2048)
    refused = plan_placement(BIG, budgets=budgets, workload=work)
    plan = plan_placement(BIG, budgets=budgets, workload=work, allow_offload=True)
    assert refused.strategy == "refuse"
    assert plan.strategy == "offload"
    assert_sound(plan, build_skeleton(BIG))
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "cpu"]
    gpu, cpu = plan.device("cuda:0"), plan.device("cpu")
    assert cpu.weights > 2 * GIB
    assert (cpu.kv_cache, cpu.activations, cpu.overhead) == (0, 0, 0)  # it only holds weights
    # Offloaded layers compute on cuda:0: it holds their KV cache and one of them at a time.
    assert gpu.kv_cache == refused.device("cuda:0").kv_cache
    assert plan.input_device == torch.device("cuda", 0)


def test_offload_goes_to_disk_only_past_the_cpu_budget() -> None:
    plan = plan_placement(
        BIG,
        budgets={0: f"{CARD}GiB", "cpu": "6GiB"},
        workload=Workload(text_tokens=512),
        allow_offload=True,
    )
    assert plan.strategy == "offload"
    assert list(dict.fromkeys(plan.device_map.values())) == ["cuda:0", "cpu", "disk"]
    cpu, disk = plan.device("cpu"), plan.device("disk")
    assert 0 < cpu.total + cpu.margin <= 6 * GIB
    assert disk.weights > 0


# --------------------------------------------------------------------------------------------
# Shorter workloads, found by planning again
# --------------------------------------------------------------------------------------------


def test_refusal_offers_the_longest_text_that_fits_and_it_does() -> None:
    work = Workload(text_tokens=200_000)
    plan = plan_placement(VL_7B, budgets={0: "24GiB"}, workload=work)
    assert plan.strategy == "refuse"
    option = next(o for o in plan.options if o.kind == "workload")
    longest = int(option.description.split("text_tokens=")[1].split()[0])
    assert 1000 < longest < work.text_tokens
    fits = plan_placement(VL_7B, budgets={0: "24GiB"}, workload=Workload(text_tokens=longest))
    assert fits.fits
    longer = Workload(text_tokens=int(longest * 1.05))
    assert not plan_placement(VL_7B, budgets={0: "24GiB"}, workload=longer).fits


# --------------------------------------------------------------------------------------------
# What can be planned
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ot.available_families())
def test_plan_a_tiny_checkpoint_directory_on_cpu_and_split_over_gpus(
    family: ot.Family, tmp_path: Path
) -> None:
    path = ot.save_tiny_model(family, tmp_path / family)
    model = ot.tiny_model(family)
    plan = plan_placement(path, budgets={"cpu": "1GiB"})
    assert (plan.strategy, plan.device_map, plan.dtype) == ("single", {"": "cpu"}, torch.float32)
    assert plan.input_device == torch.device("cpu")
    assert_sound(plan, model)
    # Two GPUs that each hold the fixed costs and 75 % of the rest of what one GPU needs (a
    # short workload, so the weights dominate the rest; the Omni thinker's vision tower alone is
    # 47 % of its weights): a split with one boundary.
    work = Workload(text_tokens=8, max_new_tokens=8)
    (one,) = plan_placement(path, budgets={0: "80GiB"}, workload=work).devices
    fixed = one.overhead + CALIBRATION.margin_bytes
    budget = (
        fixed + int(0.75 * (one.total - one.overhead)) + (one.margin - CALIBRATION.margin_bytes)
    )
    split = plan_placement(path, budgets={0: budget, 1: budget}, workload=work)
    assert split.strategy == "split"
    assert split.boundaries == 1
    assert_sound(split, build_like(model, torch.bfloat16))


def build_like(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A bf16 skeleton of the same class and config (what the GPU plans size)."""
    return build_on_meta(model.config, type(model), dtype)


def test_a_config_naming_an_unknown_architecture_asks_for_the_class(
    tiny_lm_dir: Path, tmp_path: Path
) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_lm_dir, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config["architectures"] = ["Qwen2ForSomethingElse"]
    (renamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(omnifix.UnsupportedModelError, match="Qwen2ForSomethingElse") as caught:
        plan_placement(renamed, budgets={0: "4GiB"})
    assert "model_class=" in str(caught.value)
    plan = plan_placement(renamed, model_class=ot.model_class("qwen2"), budgets={0: "4GiB"})
    assert plan.fits


def test_plain_text_model_directory(tiny_lm_dir: Path) -> None:
    plan = plan_placement(tiny_lm_dir, budgets={0: "4GiB"})
    assert plan.model == tiny_lm_dir.name
    assert (plan.strategy, plan.device_map, plan.dtype) == (
        "single",
        {"": "cuda:0"},
        torch.bfloat16,
    )
    assert plan.attn_implementation == "sdpa"
    with pytest.raises(omnifix.InvalidArgumentError, match="no vision tower"):
        plan_placement(tiny_lm_dir, budgets={0: "4GiB"}, workload=Workload(image_tokens=64))


def test_plan_from_a_config_a_class_or_a_meta_model() -> None:
    config = preset_config(VL_7B)
    cls = preset_model_class(VL_7B)
    by_name = plan_placement(VL_7B, budgets={0: "12GiB", 1: "12GiB"})
    by_config = plan_placement(config, model_class=cls, budgets={0: "12GiB", 1: "12GiB"})
    by_model = plan_placement(build_skeleton(VL_7B), budgets={0: "12GiB", 1: "12GiB"})
    assert by_name.device_map == by_config.device_map == by_model.device_map
    assert by_config.model == by_model.model == cls.__name__
    fp32 = plan_placement(build_skeleton(VL_7B), dtype="float32", budgets={0: "80GiB"})
    bf16_weights = sum(row.weights for row in by_name.devices)
    assert fp32.devices[0].weights == pytest.approx(2 * bf16_weights, rel=0.01)
    with pytest.raises(omnifix.InvalidArgumentError, match="model_class="):
        plan_placement(cls, budgets={0: "24GiB"})
    with pytest.raises(omnifix.UnsupportedModelError, match="Did you mean 'qwen2-vl-7b'"):
        plan_placement("qwen2-vl-7", budgets={0: "24GiB"})
    with pytest.raises(omnifix.CheckpointError, match="Cannot read the config"):
        plan_placement("./no/such/checkpoint", budgets={0: "24GiB"})
    with pytest.raises(omnifix.UnsupportedModelError, match="cannot plan 42 \\(of type int\\)"):
        plan_placement(42, budgets={0: "24GiB"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures this machine: no GPU expected")
def test_without_gpus_or_budgets_it_plans_for_the_cpu_in_fp32(tiny_lm_dir: Path) -> None:
    plan = plan_placement(tiny_lm_dir)
    assert (plan.strategy, plan.device_map, plan.dtype) == ("single", {"": "cpu"}, torch.float32)
    assert plan.devices[0].budget > 0  # the host memory available now
    assert plan.devices[0].overhead == 0  # no CUDA context on the cpu


def test_budget_keys_and_sizes(tiny_lm_dir: Path) -> None:
    plan = plan_placement(
        tiny_lm_dir,
        budgets={"cuda:1": "2GiB", torch.device("cuda", 0): 2 * GIB, "gpu:2": "2GB"},
    )
    assert [(row.device, row.budget) for row in plan.devices] == [
        ("cuda:0", 2 * GIB),
        ("cuda:1", 2 * GIB),
        ("cuda:2", 2_000_000_000),
    ]
    with pytest.raises(omnifix.DeviceError, match="Did you mean 'cuda:0'"):
        plan_placement(tiny_lm_dir, budgets={"cdua:0": "2GiB"})
    with pytest.raises(omnifix.DeviceError, match="CUDA GPUs"):
        plan_placement(tiny_lm_dir, budgets={"mps": "2GiB"})
    with pytest.raises(omnifix.InvalidArgumentError, match="twice"):
        plan_placement(tiny_lm_dir, budgets={0: "2GiB", "cuda:0": "2GiB"})
    with pytest.raises(omnifix.InvalidArgumentError, match="not a memory size"):
        plan_placement(tiny_lm_dir, budgets={0: "lots"})
    with pytest.raises(omnifix.InvalidArgumentError, match="gives no device"):
        plan_placement(tiny_lm_dir, budgets={})
    with pytest.raises(omnifix.InvalidArgumentError, match="no GPU and no cpu"):
        plan_placement(tiny_lm_dir, budgets={"disk": "2GiB"})


def test_workload_validation_and_token_counts() -> None:
    work = Workload(batch_size=2, text_tokens=100, image_tokens=64, video_seconds=1.5)
    assert work.video_tokens == 384
    assert work.prompt_tokens == 100 + 64 + 384
    assert "batch 2 x (100 text + 64 image + 384 video (1.5 s) tokens)" in str(work)
    with pytest.raises(omnifix.InvalidArgumentError, match="batch_size=0"):
        Workload(batch_size=0)
    with pytest.raises(omnifix.InvalidArgumentError, match="text_tokens=-1"):
        Workload(text_tokens=-1)
    with pytest.raises(omnifix.InvalidArgumentError, match="whole number"):
        Workload(text_tokens=10.5)  # type: ignore[arg-type]


def test_str_and_to_dict() -> None:
    plan = plan_placement(VL_7B, budgets={0: "12GiB", 1: "12GiB"})
    text = str(plan)
    assert text.startswith(f"PlacementPlan for {VL_7B}: split (bfloat16, sdpa) - fits")
    lines = text.splitlines()
    assert lines[lines.index("memory per device") + 1].split() == ["cuda:0", "cuda:1"]
    for row in plan.devices:
        assert format_bytes(row.total) in next(line for line in lines if line.startswith("total"))
    assert text.count(plan.reason) == 1
    first, second = (row for row in plan.devices)
    last_on_first = max(
        i
        for n, d in plan.device_map.items()
        if d == "cuda:0" and (i := _layer_index(n)) is not None
    )
    assert f"layers.0-{last_on_first}" in text
    assert f"layers.{last_on_first + 1}-27" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["strategy"] == "split"
    assert data["dtype"] == "bfloat16"
    assert [row["total"] for row in data["devices"]] == [first.total, second.total]
    assert data["device_map"] == plan.device_map


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=4, max_value=48), min_size=1, max_size=4),
    text=st.integers(min_value=1, max_value=40_000),
    attn=st.sampled_from(["sdpa", "eager"]),
)
def test_a_plan_that_fits_keeps_every_budget_and_places_every_parameter_once(
    sizes: list[int], text: int, attn: str
) -> None:
    budgets = {index: size * GIB for index, size in enumerate(sizes)}
    plan = plan_placement(
        VL_7B, budgets=budgets, attn_implementation=attn, workload=Workload(text_tokens=text)
    )
    if plan.fits:
        assert_sound(plan, _skeleton_of(VL_7B))
        assert plan.boundaries == len(plan.devices_used) - 1
    else:
        assert plan.strategy == "refuse"
        assert not all(row.fits for row in plan.devices) or plan.options


@cache
def _skeleton_of(preset: str) -> torch.nn.Module:
    return build_skeleton(preset)


def test_presets_all_plan_on_two_gpus() -> None:
    one_card = [p for p in PRESETS if p not in ("qwen2.5-vl-72b", "qwen3-vl-235b-a22b")]
    for preset in filter(_available, one_card):
        plan = plan_placement(preset, budgets={0: "80GiB", 1: "80GiB"})
        assert plan.strategy == "single", preset
        assert plan.device_map == {"": "cuda:0"}


# --------------------------------------------------------------------------------------------
# Balanced splits
# --------------------------------------------------------------------------------------------

#: The issue's bound on the predicted utilisation of the most loaded used GPU over the least.
BALANCE = 1.10
BALANCE_WORKLOADS = {
    "text-8k": Workload(text_tokens=8192),
    "text-32k": Workload(text_tokens=32768),
    "image-4096": Workload(text_tokens=256, image_tokens=4096),
    "audio-30s": Workload(text_tokens=256, audio_seconds=30),
}
OMNI_7B = pytest.param("qwen2.5-omni-7b", marks=needs("qwen2.5-omni-7b"))


def _utilisation(row: omnifix.DeviceBudget) -> float:
    return (row.total + row.margin) / row.budget


def _used_rows(plan: PlacementPlan) -> list[omnifix.DeviceBudget]:
    return [row for row in plan.devices if row.device in plan.devices_used]


def _imbalance(rows: Sequence[omnifix.DeviceBudget]) -> float:
    utilisation = [_utilisation(row) for row in rows]
    return max(utilisation) / min(utilisation)


def _allowed_imbalance(preset: str, plan: PlacementPlan) -> float:
    """``BALANCE``, or more where moving the largest decoder layer is a bigger step than that.

    One layer (its weights, its KV cache and the margin on that) is the smallest step a
    contiguous split can take: the most and the least utilised GPU may stay that step apart.
    """
    model = _skeleton_of(preset)
    work = plan.workload
    tokens = work.batch_size * (work.prompt_tokens + work.max_new_tokens)
    step = max(
        max(_bytes(model.get_submodule(name)) for name in decoder.layers)
        + (1 + CALIBRATION.margin_fraction)
        * (2 * decoder.kv_heads * decoder.head_dim * plan.dtype.itemsize * tokens)
        for decoder in describe(model).decoders
        if decoder.role == "text"
    )
    rows = _used_rows(plan)
    low, high = min(rows, key=_utilisation), max(rows, key=_utilisation)
    spread = step / low.budget + step / high.budget
    return max(BALANCE, (_utilisation(low) + spread) / _utilisation(low))


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _has_towers_for(preset: str, work: Workload) -> bool:
    kinds = {tower.kind for tower in describe(_skeleton_of(preset)).towers}
    return not (work.image_tokens and "vision" not in kinds) and not (
        work.audio_seconds and "audio" not in kinds
    )


@pytest.mark.parametrize(
    ("preset", "budgets", "work"),
    [
        pytest.param(
            "qwen2.5-omni-7b",
            {0: "24GiB", 1: "24GiB"},
            BALANCE_WORKLOADS["text-8k"],
            marks=needs("qwen2.5-omni-7b"),
            id="omni-7b-2x24-text-8k",
        ),
        pytest.param(
            VL_7B, {0: "14GiB", 1: "14GiB"}, Workload(text_tokens=2048), id="vl-7b-2x14-text-2k"
        ),
    ],
)
def test_a_split_filled_in_order_lopsided_is_balanced(
    preset: str, budgets: dict[int, str], work: Workload
) -> None:
    # Filled in order, the first GPU would be nearly full and the second nearly idle (Omni: 96 %
    # and 10 % of 24 GiB; VL: 99 % and 28-40 % of 14 GiB).
    plan = plan_placement(preset, budgets=budgets, workload=work)
    assert plan.strategy == "split"
    assert_sound(plan, _skeleton_of(preset))
    assert _imbalance(_used_rows(plan)) <= BALANCE
    assert plan.devices_used == ("cuda:0", "cuda:1")
    assert plan.boundaries == 1
    assert plan.input_device == torch.device("cuda", 0)
    assert list(plan.device_map.values())[-1] == "cuda:1"
    assert "balanced to within" in plan.reason
    assert f"balanced to within {100 * (_imbalance(_used_rows(plan)) - 1):.1f} %" in plan.reason


@pytest.mark.parametrize("budgets", [{0: "24GiB", 1: "24GiB"}, {0: "14GiB", 1: "14GiB"}], ids=str)
@pytest.mark.parametrize("work", BALANCE_WORKLOADS.values(), ids=BALANCE_WORKLOADS)
@pytest.mark.parametrize("preset", [VL_7B, "qwen2-audio-7b", OMNI_7B])
def test_every_split_balances_predicted_utilisation_across_the_used_gpus(
    preset: str, work: Workload, budgets: dict[int, str]
) -> None:
    if not _has_towers_for(preset, work):
        pytest.skip(f"{preset} has no tower for this input")
    plan = plan_placement(preset, budgets=budgets, workload=work)
    if plan.strategy != "split":
        assert plan.strategy in ("single", "refuse")  # one GPU or none: nothing to balance
        return
    assert_sound(plan, _skeleton_of(preset))
    assert _imbalance(_used_rows(plan)) <= _allowed_imbalance(preset, plan)
    assert "balanced to within" in plan.reason


@pytest.mark.parametrize(
    ("preset", "budgets", "text"),
    [
        (VL_7B, {0: "10GiB", 1: "14GiB"}, 2048),
        (VL_7B, {0: "14GiB", 1: "10GiB"}, 2048),
        pytest.param(
            "qwen2.5-omni-7b", {0: "16GiB", 1: "24GiB"}, 8192, marks=needs("qwen2.5-omni-7b")
        ),
        pytest.param(
            "qwen2.5-omni-7b", {0: "24GiB", 1: "16GiB"}, 8192, marks=needs("qwen2.5-omni-7b")
        ),
    ],
    ids=str,
)
def test_unequal_budgets_are_balanced_by_utilisation_not_bytes(
    preset: str, budgets: dict[int, str], text: int
) -> None:
    plan = plan_placement(preset, budgets=budgets, workload=Workload(text_tokens=text))
    assert plan.strategy == "split"
    assert_sound(plan, _skeleton_of(preset))
    assert _imbalance(_used_rows(plan)) <= _allowed_imbalance(preset, plan)
    small, large = sorted(_used_rows(plan), key=lambda row: row.budget)
    # The same fraction of 1.4-1.5x the memory: the larger GPU holds clearly more.
    assert (large.total + large.margin) / (small.total + small.margin) > 1.2


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=5, max_value=20), min_size=2, max_size=4),
    text=st.integers(min_value=1, max_value=32_768),
    image=st.sampled_from([0, 1024, 4096]),
)
def test_a_balanced_split_keeps_its_gpus_in_order_and_reports_its_spread(
    sizes: list[int], text: int, image: int
) -> None:
    budgets = {index: size * GIB for index, size in enumerate(sizes)}
    plan = plan_placement(
        VL_7B, budgets=budgets, workload=Workload(text_tokens=text, image_tokens=image)
    )
    if plan.strategy != "split":
        assert plan.strategy in ("single", "refuse")
        return
    assert_sound(plan, _skeleton_of(VL_7B))
    # Contiguous blocks on GPUs in index order: one boundary between consecutive GPUs.
    assert list(plan.devices_used) == sorted(plan.devices_used, key=lambda d: int(d[5:]))
    assert plan.boundaries == len(plan.devices_used) - 1
    # The reason states the spread of the used GPUs' predicted utilisation.
    shares = [100 * _utilisation(row) for row in _used_rows(plan)]
    assert f"({min(shares):.1f}-{max(shares):.1f} % of each GPU's budget)" in plan.reason


# --------------------------------------------------------------------------------------------
# Margins against the GPU cases that ran out of memory
# --------------------------------------------------------------------------------------------
# The planner's margins against the four GPU cases it predicted to fit that ran out of memory.
#
# Measured on 2 x H200 (torch 2.11, transformers 5.17, `benchmarks/accuracy.py`: full-size presets,
# random bf16 weights on the plan's map, each GPU capped at its budget with
# `set_per_process_memory_fraction`, generate with 16 new tokens; the run's records are
# `benchmarks/results/accuracy-h200x2-tf5.17-run1.json`). Each case ran out of memory on cuda:0; the
# record gives the allocated peak (`max_memory_allocated` + the bytes outside the allocator), the
# memory the process held at the OOM (CUDA context and cache included) and the failed allocation.
# The need of that map on cuda:0 is at least either sum, so the plan's predicted need there (total +
# margin) for the same map must be too.

#: The OOM messages give GiB to two decimals: half a hundredth less is a lower bound.
ROUNDING = GIB // 200
NEW_TOKENS = 16


@dataclass(frozen=True)
class OomCase:
    """One 2-GPU case of the accuracy run that ran out of memory on cuda:0."""

    preset: str
    #: "thinker": the Omni thinker alone (as the accuracy run planned it); "model": the whole.
    part: str
    attn: str
    text_tokens: int
    #: Each GPU's budget (GiB) and the decoder layers the plan put on cuda:0.
    budget_gib: int
    layers_on_0: int
    #: Allocated peak on cuda:0 (max_memory_allocated + bytes outside the allocator), bytes.
    peak: int
    #: "this process has X GiB memory in use" and "Tried to allocate Y GiB" of the OOM message.
    in_use_gib: float
    failed_gib: float

    @property
    def lower_bound(self) -> int:
        """The least cuda:0 needed: what it held (or its peak) plus what it failed to get."""
        failed = int(self.failed_gib * GIB) - ROUNDING
        return max(self.peak, int(self.in_use_gib * GIB) - ROUNDING) + failed


# Figures from the accuracy run's OOM records (see the module docstring).
CASES = [
    # "Tried to allocate 1.16 GiB" = one 32768 x 18944 bf16 MLP intermediate.
    pytest.param(
        OomCase("qwen2.5-vl-7b", "model", "sdpa", 32768, 15, 13, 14_660_134_400, 14.04, 1.16),
        marks=needs("qwen2.5-vl-7b"),
        id="qwen2.5-vl-7b-text-32k-sdpa",
    ),
    # "Tried to allocate 7.00 GiB" = 28 heads x 8192^2 fp32 softmax, 7 GiB reserved unusable.
    pytest.param(
        OomCase("qwen2.5-vl-7b", "model", "eager", 8192, 37, 13, 28_672_308_736, 33.76, 7.00),
        marks=needs("qwen2.5-vl-7b"),
        id="qwen2.5-vl-7b-text-8k-eager",
    ),
    # "Tried to allocate 9.28 GiB" = 32768 x 151936 bf16 logits copied back to cuda:0.
    pytest.param(
        OomCase("qwen2.5-omni-7b", "thinker", "sdpa", 32768, 19, 17, 18_293_652_992, 13.62, 9.28),
        marks=needs("qwen2.5-omni-7b"),
        id="qwen2.5-omni-7b-thinker-text-32k-sdpa",
    ),
    # "Tried to allocate 2.38 GiB" = 8192 x 156032 bf16 logits copied back to cuda:0.
    pytest.param(
        OomCase("qwen2-audio-7b", "model", "sdpa", 8192, 15, 17, 13_329_886_720, 12.66, 2.38),
        id="qwen2-audio-7b-text-8k-sdpa",
    ),
]


@cache
def _model(preset: str, part: str) -> torch.nn.Module:
    whole = build_skeleton(preset)
    model: torch.nn.Module = whole.thinker if part == "thinker" else whole
    return model


def _units(model: torch.nn.Module, keep: tuple[str, ...], prefix: str = "") -> Iterator[str]:
    """Module names in order: whole children, except those holding ``keep``, which are opened."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if full in keep:
            yield full
        elif any(k.startswith(f"{full}.") for k in keep):
            yield from _units(child, keep, f"{full}.")
        else:
            yield full


def _split_map(model: torch.nn.Module, layers_on_0: int) -> dict[str, str]:
    """The measured map: everything up to the text decoder's layer ``layers_on_0`` on cuda:0."""
    anatomy = describe(model)
    assert anatomy.text is not None
    assert anatomy.lm_head is not None
    layers = anatomy.text.layers
    device_map: dict[str, str] = {}
    device = "cuda:0"
    for name in _units(model, (*layers, anatomy.lm_head)):
        if name == layers[layers_on_0]:
            device = "cuda:1"
        device_map[name] = device
    return device_map


def _attempt(
    model: torch.nn.Module,
    work: Workload,
    attn: str,
    budget_gib: int,
    device_map: dict[str, str],
) -> Attempt:
    """What the planner predicts for ``device_map``, a map it did not choose (a measured one)."""
    skeleton = load_skeleton(model, model_class=None, dtype=torch.bfloat16)
    budgets = resolve_budgets({0: f"{budget_gib}GiB", 1: f"{budget_gib}GiB"}, allow_offload=False)
    return evaluate(Request(skeleton, budgets, attn, work, allow_offload=False), device_map)


def _peaks(model: torch.nn.Module, work: Workload, device_map: dict[str, str]) -> Any:
    """The memory model's phase peaks per device, with each module where ``device_map`` runs it."""
    placement = Placement.of(device_map)
    return estimate(
        describe(model),
        execution_device=lambda name: placement.runs_on(name) or placement.main,
        load=work,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
    )


@pytest.mark.parametrize("case", CASES)
def test_measured_map_is_predicted_to_need_at_least_what_it_took(case: OomCase) -> None:
    model = _model(case.preset, case.part)
    work = Workload(text_tokens=case.text_tokens, max_new_tokens=NEW_TOKENS)
    device_map = _split_map(model, case.layers_on_0)
    row = _attempt(model, work, case.attn, case.budget_gib, device_map).row("cuda:0")
    assert row.total + row.margin >= case.lower_bound, row
    assert not row.fits  # so the planner no longer picks it
    plan = plan_placement(
        model,
        budgets={0: f"{case.budget_gib}GiB", 1: f"{case.budget_gib}GiB"},
        dtype=torch.bfloat16,
        attn_implementation=case.attn,
        workload=work,
    )
    assert plan.device_map != device_map or not plan.fits


def _text_vocab(preset: str) -> int:
    config: Any = preset_config(preset)
    text = getattr(config, "text_config", config)
    vocab = text.vocab_size
    assert isinstance(vocab, int)
    return vocab


def test_a_split_copies_every_prompt_tokens_logits_back_to_the_input_gpu() -> None:
    work = Workload(text_tokens=8192, max_new_tokens=NEW_TOKENS)
    plan = plan_placement("qwen2-audio-7b", budgets={0: "22GiB", 1: "22GiB"}, workload=work)
    assert plan.strategy == "split"
    first, last = plan.devices
    assert (first.phase, last.phase) == ("logits copy", "logits")  # lm_head is on cuda:1
    # S x vocab x bf16 (fp32 on transformers 4.45, which returns logits upcast), and the inputs.
    upcast = describe(_model("qwen2-audio-7b", "model")).logits_upcast
    copy = 8192 * _text_vocab("qwen2-audio-7b") * (4 if upcast else 2)
    # At the end of the prefill the cache holds the prompt's 8192 tokens, not yet the new ones.
    prefill_kv = first.kv_cache * 8192 // (8192 + NEW_TOKENS)
    assert 0 < first.kv_cache + first.activations - prefill_kv - copy < 2**20
    # The copy needs a fresh segment of its size (CALIBRATION.fresh_blocks).
    assert first.allocator >= copy


@needs("qwen2.5-vl-7b")
def test_with_logits_to_keep_the_copy_is_one_row_per_sample() -> None:
    model = _model("qwen2.5-vl-7b", "model")
    work = Workload(text_tokens=8192, batch_size=2, max_new_tokens=NEW_TOKENS)
    first = _peaks(model, work, _split_map(model, 13))["cuda:0"]
    assert first.phases["logits copy"] - first.prefill_kv == 2 * _text_vocab("qwen2.5-vl-7b") * 2
    assert first.peak_phase == "prefill"


def test_no_split_no_logits_copy(predict_phases: PredictPhases) -> None:
    work = Workload(text_tokens=8192, max_new_tokens=NEW_TOKENS)
    plan = plan_placement("qwen2-audio-7b", budgets={0: "80GiB"}, workload=work)
    assert plan.strategy == "single"
    assert plan.device("cuda:0").phase == "logits"
    whole = _peaks(_model("qwen2-audio-7b", "model"), work, {"": "cuda:0"})
    assert "logits copy" not in whole["cuda:0"].phases


@needs("qwen2.5-vl-7b")
def test_default_allocator_reserves_its_share_or_one_mlp_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    cal = CALIBRATION
    work = Workload(text_tokens=32768, max_new_tokens=NEW_TOKENS)
    plan = plan_placement("qwen2.5-vl-7b", budgets={0: "80GiB"}, workload=work)
    (row,) = plan.devices
    block = 32768 * 18944 * 2  # rows x intermediate x bf16: the 1.16 GiB that failed to fit
    allocated = row.weights + row.kv_cache + row.activations
    assert row.allocator == int(max(cal.reserved_gap * allocated, block))
    assert row.margin == int(
        cal.margin_bytes + cal.margin_fraction * (row.kv_cache + row.activations)
    )
    assert row.fits


@needs("qwen2.5-vl-7b")
def test_eager_keeps_two_softmax_blocks_or_its_share_of_activations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    cal = CALIBRATION
    for tokens in (1024, 8192):
        work = Workload(text_tokens=tokens, max_new_tokens=NEW_TOKENS)
        plan = plan_placement(
            "qwen2.5-vl-7b", budgets={0: "80GiB"}, attn_implementation="eager", workload=work
        )
        (row,) = plan.devices
        softmax = 28 * tokens * tokens * 4  # heads x S^2 x fp32
        allocated = row.weights + row.kv_cache + row.activations
        expected = max(
            cal.reserved_gap * allocated, 2 * softmax, cal.eager_block_fraction * row.activations
        )
        assert row.allocator == int(expected)
