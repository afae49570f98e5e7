"""Bug zoo, case 3: GPU 0 out of memory while GPU 1 has room (seed 002).

Two GPUs capped at 24 GiB each with ``torch.cuda.set_per_process_memory_fraction`` (two
simulated RTX 4090s), a full-size Qwen2.5-VL-7B with random bf16 weights saved as a real
checkpoint, and a large image. ``device_map="auto"`` balances the *weights* over both cards, but
the vision tower's work (with eager attention: 16 heads x patches^2 scores per full-attention
layer) lands on GPU 0 on top of its share of the weights. ``load_safely`` plans for that work:
it refuses what cannot fit (with the options that do: sdpa) and leaves GPU 0 the room otherwise.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

import omnifix
import omnifix.testing

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType

pytestmark = [pytest.mark.multi_gpu, pytest.mark.slow]

GIB = 2**30
CAP = 24 * GIB
BUDGETS = {0: "24GiB", 1: "24GiB"}
#: What device_map="auto" runs out of memory on (GPU 0), and what the planner refuses for eager.
LARGE = omnifix.Workload(text_tokens=256, image_tokens=2560, max_new_tokens=16)
#: A little smaller: the planner's split leaves GPU 0 the room for the vision tower's work.
MEDIUM = omnifix.Workload(text_tokens=256, image_tokens=2304, max_new_tokens=16)


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _run(
    model: Any, workload: omnifix.Workload, bench_models: ModuleType
) -> tuple[str, dict[str, float]]:
    """Generate on ``workload``; the first line of an OOM (or "ran"), and each GPU's peak."""
    import torch

    inputs = bench_models.workload_inputs(model, workload)
    for gpu in (0, 1):
        torch.cuda.reset_peak_memory_stats(gpu)
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=workload.max_new_tokens, do_sample=False)
        outcome = "ran"
    except torch.cuda.OutOfMemoryError as error:
        outcome = str(error).splitlines()[0]
    peaks = {f"cuda:{gpu}": round(torch.cuda.max_memory_allocated(gpu) / GIB, 2) for gpu in (0, 1)}
    return outcome, peaks


def _weights_per_gpu(model: Any) -> dict[str, float]:
    totals: dict[str, float] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        key = str(tensor.device)
        totals[key] = totals.get(key, 0.0) + tensor.numel() * tensor.element_size() / GIB
    return {key: round(value, 2) for key, value in sorted(totals.items())}


def test_auto_runs_gpu0_out_of_memory_where_load_safely_fits(
    tmp_path: Path, record: Callable[..., None], bench_models: ModuleType
) -> None:
    import torch

    from omnifix._compat import dtype_keyword
    from omnifix._plan.presets import preset_model_class
    from omnifix._plan.skeleton import build_skeleton

    if "qwen2.5-vl" not in omnifix.testing.available_families():
        pytest.skip("this transformers has no Qwen2.5-VL")
    checkpoint = tmp_path / "qwen2.5-vl-7b"
    skeleton = build_skeleton("qwen2.5-vl-7b")
    bench_models.materialize(skeleton, {"": 0})
    skeleton.save_pretrained(checkpoint)
    del skeleton
    _free()

    model_class = preset_model_class("qwen2.5-vl-7b")
    dtype = {dtype_keyword(): torch.bfloat16}
    for gpu in (0, 1):
        torch.cuda.set_per_process_memory_fraction(
            CAP / torch.cuda.get_device_properties(gpu).total_memory, gpu
        )
    outcomes: dict[str, Any] = {}
    try:
        for attn in ("eager", "sdpa"):
            model = model_class.from_pretrained(
                checkpoint, device_map="auto", max_memory=BUDGETS, attn_implementation=attn, **dtype
            )
            outcomes[f"auto {attn}"] = (*_run(model, LARGE, bench_models), _weights_per_gpu(model))
            del model
            _free()
        held = [torch.cuda.memory_allocated(gpu) for gpu in (0, 1)]
        with pytest.raises(omnifix.InsufficientMemoryError) as refused:
            omnifix.load_safely(
                checkpoint, attn_implementation="eager", max_memory=BUDGETS, workload=LARGE
            )
        assert [torch.cuda.memory_allocated(gpu) for gpu in (0, 1)] == held  # nothing loaded
        for attn, workload in (("sdpa", LARGE), ("eager", MEDIUM)):
            model = omnifix.load_safely(
                checkpoint, attn_implementation=attn, max_memory=BUDGETS, workload=workload
            )
            report = omnifix.placement_report(model)
            outcomes[f"load_safely {attn}"] = (
                *_run(model, workload, bench_models),
                _weights_per_gpu(model),
                report.strategy,
            )
            del model
            _free()
        model = model_class.from_pretrained(
            checkpoint, device_map="auto", max_memory=BUDGETS, attn_implementation="eager", **dtype
        )
        outcomes["auto eager, medium"] = (
            *_run(model, MEDIUM, bench_models),
            _weights_per_gpu(model),
        )
        del model
        _free()
    finally:
        for gpu in (0, 1):
            torch.cuda.set_per_process_memory_fraction(1.0, gpu)

    before, before_peaks, before_weights = outcomes["auto eager"]
    assert "out of memory" in before, outcomes
    assert "GPU 0" in before, before
    assert before_peaks["cuda:1"] < 20, before_peaks  # GPU 1 had room
    message = str(refused.value)
    assert "sdpa" in message, message  # the option that fits
    assert message.splitlines()[-1].startswith("Fix:")
    for key in ("load_safely sdpa", "load_safely eager"):
        assert outcomes[key][0] == "ran", outcomes
    eager_weights = outcomes["load_safely eager"][2]
    assert eager_weights["cuda:0"] < before_weights["cuda:0"]  # room left for the tower's work
    record(
        case="3. GPU 0 out of memory with 2 x 24 GiB (full-size Qwen2.5-VL-7B, large image)",
        before=f"device_map='auto', eager, {LARGE.image_tokens}-token image: {before}",
        auto_eager=f"weights {before_weights} GiB, peaks {before_peaks} GiB",
        auto_sdpa=f"{outcomes['auto sdpa'][0]}; peaks {outcomes['auto sdpa'][1]} GiB",
        load_safely_eager_refused=message.splitlines()[0],
        after=f"load_safely sdpa ({LARGE.image_tokens} tokens): {outcomes['load_safely sdpa'][0]}, "
        f"{outcomes['load_safely sdpa'][3]}, weights {outcomes['load_safely sdpa'][2]} GiB, "
        f"peaks {outcomes['load_safely sdpa'][1]} GiB; load_safely eager "
        f"({MEDIUM.image_tokens} tokens): {outcomes['load_safely eager'][0]}, "
        f"{outcomes['load_safely eager'][3]}, weights {eager_weights} GiB, peaks "
        f"{outcomes['load_safely eager'][1]} GiB; device_map='auto' eager on the same: "
        f"{outcomes['auto eager, medium'][0]}",
    )
