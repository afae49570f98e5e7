"""The planner's margins against the four GPU cases it predicted to fit that ran out of memory.

Measured on 2 x H200 (torch 2.11, transformers 5.17, ``benchmarks/accuracy.py``: full-size presets,
random bf16 weights on the plan's map, each GPU capped at its budget with
``set_per_process_memory_fraction``, generate with 16 new tokens; the run's records, to be saved as
``benchmarks/results/accuracy-h200x2-tf5.17.json``). Each case ran out of memory on cuda:0; the
record gives the allocated peak (``max_memory_allocated`` + the bytes outside the allocator), the
memory the process held at the OOM (CUDA context and cache included) and the failed allocation.
The need of that map on cuda:0 is at least either sum, so the plan's predicted need there (total +
margin) for the same map must be too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import pytest
import torch

import omnifix
from omnifix import Workload, plan_placement
from omnifix._budgets import resolve_budgets
from omnifix._estimate import CALIBRATION
from omnifix._plan import _Attempt, _evaluate, _Request, predict_phases
from omnifix._presets import build_skeleton, preset_config, preset_model_class
from omnifix._skeleton import load_skeleton

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

GIB = 2**30
#: The OOM messages give GiB to two decimals: half a hundredth less is a lower bound.
ROUNDING = GIB // 200
NEW_TOKENS = 16


@cache
def _available(preset: str) -> bool:
    try:
        preset_model_class(preset)
    except omnifix.UnsupportedModelError:
        return False
    return True


def needs(preset: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _available(preset), reason=f"{preset} needs newer transformers")


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
def _model(preset: str, part: str) -> nn.Module:
    whole = build_skeleton(preset)
    model: nn.Module = whole.thinker if part == "thinker" else whole
    return model


def _units(model: nn.Module, keep: tuple[str, ...], prefix: str = "") -> Iterator[str]:
    """Module names in order: whole children, except those holding ``keep``, which are opened."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if full in keep:
            yield full
        elif any(k.startswith(f"{full}.") for k in keep):
            yield from _units(child, keep, f"{full}.")
        else:
            yield full


def _split_map(model: nn.Module, layers_on_0: int) -> dict[str, int | str]:
    """The measured map: everything up to the text decoder's layer ``layers_on_0`` on cuda:0."""
    anatomy = load_skeleton(model, model_class=None, dtype=torch.bfloat16).anatomy
    assert anatomy.text is not None
    assert anatomy.lm_head is not None
    layers = anatomy.text.layers
    device_map: dict[str, int | str] = {}
    device = 0
    for name in _units(model, (*layers, anatomy.lm_head)):
        if name == layers[layers_on_0]:
            device = 1
        device_map[name] = device
    return device_map


def _attempt(
    model: nn.Module, work: Workload, attn: str, budget_gib: int, device_map: dict[str, int | str]
) -> _Attempt:
    skeleton = load_skeleton(model, model_class=None, dtype=torch.bfloat16)
    budgets = resolve_budgets({0: f"{budget_gib}GiB", 1: f"{budget_gib}GiB"}, allow_offload=False)
    return _evaluate(_Request(skeleton, budgets, attn, work, allow_offload=False), device_map)


@pytest.mark.parametrize("case", CASES)
def test_measured_map_is_predicted_to_need_at_least_what_it_took(case: OomCase) -> None:
    model = _model(case.preset, case.part)
    work = Workload(text_tokens=case.text_tokens, max_new_tokens=NEW_TOKENS)
    device_map = _split_map(model, case.layers_on_0)
    row = _attempt(model, work, case.attn, case.budget_gib, device_map).row(0)
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
    model = _model("qwen2-audio-7b", "model")
    work = Workload(text_tokens=8192, max_new_tokens=NEW_TOKENS)
    attempt = _attempt(model, work, "sdpa", 40, _split_map(model, 17))
    first = attempt.usage[0]
    copy = first.phases["logits copy"] - first.kv_cache
    upcast = load_skeleton(model, model_class=None, dtype=torch.bfloat16).anatomy.logits_upcast
    # S x vocab x bf16 (fp32 on transformers 4.45, which returns logits upcast).
    assert copy == 8192 * _text_vocab("qwen2-audio-7b") * (4 if upcast else 2)
    assert attempt.row(0).phase == "logits copy"
    assert "logits copy" not in attempt.usage[1].phases  # lm_head's own GPU: the logits phase
    # The copy needs a fresh segment of its size (CALIBRATION.fresh_blocks).
    assert first.fresh >= copy


@needs("qwen2.5-vl-7b")
def test_with_logits_to_keep_the_copy_is_one_row_per_sample() -> None:
    model = _model("qwen2.5-vl-7b", "model")
    work = Workload(text_tokens=8192, batch_size=2, max_new_tokens=NEW_TOKENS)
    first = _attempt(model, work, "sdpa", 40, _split_map(model, 13)).usage[0]
    assert first.phases["logits copy"] - first.kv_cache == 2 * _text_vocab("qwen2.5-vl-7b") * 2
    assert first.peak_phase == "prefill"


def test_no_split_no_logits_copy() -> None:
    work = Workload(text_tokens=8192, max_new_tokens=NEW_TOKENS)
    plan = plan_placement("qwen2-audio-7b", budgets={0: "80GiB"}, workload=work)
    assert plan.strategy == "single"
    assert plan.device("cuda:0").phase == "logits"
    assert "logits copy" not in predict_phases("qwen2-audio-7b", workload=work)
    model = _model("qwen2-audio-7b", "model")
    assert "logits copy" not in _attempt(model, work, "sdpa", 80, {"": 0}).usage[0].phases


@needs("qwen2.5-vl-7b")
def test_one_gpu_margin_grows_by_one_mlp_block_only() -> None:
    work = Workload(text_tokens=32768, max_new_tokens=NEW_TOKENS)
    model = _model("qwen2.5-vl-7b", "model")
    attempt = _attempt(model, work, "sdpa", 80, {"": 0})
    row, usage = attempt.row(0), attempt.usage[0]
    block = 32768 * 18944 * 2  # rows x intermediate x bf16: the 1.16 GiB that failed to fit
    assert usage.fresh == block
    fixed = CALIBRATION.margin_bytes
    assert row.margin == int(fixed + 0.10 * (row.kv_cache + row.activations)) + block
    assert row.fits


@needs("qwen2.5-vl-7b")
def test_eager_keeps_two_softmax_blocks_or_its_share_of_activations() -> None:
    model = _model("qwen2.5-vl-7b", "model")
    cal = CALIBRATION
    for tokens in (1024, 8192):
        work = Workload(text_tokens=tokens, max_new_tokens=NEW_TOKENS)
        row = _attempt(model, work, "eager", 80, {"": 0}).row(0)
        base = int(cal.margin_bytes + cal.margin_fraction * (row.kv_cache + row.activations))
        softmax = 28 * tokens * tokens * 4  # heads x S^2 x fp32
        expected = max(2 * softmax, int(cal.eager_block_fraction * row.activations))
        assert row.margin - base == expected
