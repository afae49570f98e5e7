"""The planner against real GPUs: full-size presets, random weights, predicted vs measured peaks.

Each case plans with explicit budgets, builds the preset on ``meta``, gives it random weights on the
plan's devices (as ``from_pretrained`` would place a checkpoint), runs ``generate`` on the workload
and compares each GPU's measured peak (``torch.cuda.max_memory_reserved``, what the caching
allocator holds and what a memory cap limits, plus what the CUDA context and libraries hold outside
the allocator) with the plan's predicted total, which is a reserved peak under the allocator
configuration in effect. The allocated peak is recorded beside it. Results go to
``OMNIFIX_PLANNER_RECORD`` (JSON lines) for ``docs/planning.md``.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import omnifix

if TYPE_CHECKING:
    from types import ModuleType

GIB = 2**30
#: The planner must predict each GPU's peak within this relative error.
TOLERANCE = 0.10

CASES: list[tuple[str, str, dict[int, str], dict[str, Any]]] = [
    ("qwen2.5-vl-7b", "sdpa", {0: "40GiB"}, {"text_tokens": 8192, "max_new_tokens": 16}),
    ("qwen2.5-vl-7b", "sdpa", {0: "40GiB"}, {"text_tokens": 256, "image_tokens": 4096}),
    ("qwen2.5-vl-7b", "eager", {0: "60GiB"}, {"text_tokens": 8192, "max_new_tokens": 16}),
    ("qwen2.5-vl-7b", "sdpa", {0: "40GiB"}, {"text_tokens": 256, "video_seconds": 30}),
    ("qwen2-audio-7b", "sdpa", {0: "40GiB"}, {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2-audio-7b", "sdpa", {0: "40GiB"}, {"text_tokens": 8192, "max_new_tokens": 16}),
    ("qwen2.5-omni-7b", "sdpa", {0: "60GiB"}, {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2.5-vl-7b", "sdpa", {0: "13GiB", 1: "13GiB"}, {"text_tokens": 16384}),
    ("qwen2.5-vl-7b", "sdpa", {0: "14GiB", 1: "14GiB"}, {"text_tokens": 256, "image_tokens": 4096}),
]


def _run(
    preset: str,
    attn: str,
    budgets: dict[int, str],
    work: dict[str, Any],
    *,
    bench_models: ModuleType,
    bench_memory: ModuleType,
) -> dict[str, Any]:
    import torch

    from omnifix._plan.skeleton import build_skeleton

    workload = omnifix.Workload(**work)
    plan = omnifix.plan_placement(
        preset, budgets=budgets, dtype=torch.bfloat16, attn_implementation=attn, workload=workload
    )
    assert plan.fits, plan.explain()
    gpus = sorted({torch.device(d).index for d in plan.device_map.values() if d.startswith("cuda")})
    gc.collect()
    torch.cuda.empty_cache()
    # Anything still allocated belongs to earlier tests, not to this case: measure above it.
    before = {gpu: torch.cuda.memory_allocated(gpu) for gpu in gpus}
    reserved_before = {gpu: torch.cuda.memory_reserved(gpu) for gpu in gpus}
    model: Any = build_skeleton(preset)
    bench_models.materialize(model, plan.device_map)
    model.eval()
    bench_memory.set_attention(model, attn)
    # Qwen2.5-Omni: text generation is the thinker's (the full class's generate also wants the
    # speaker files of a real checkpoint); every part's weights are loaded all the same.
    target = getattr(model, "thinker", model)
    inputs = bench_models.workload_inputs(target, workload)
    pin = omnifix.pin_embeddings(model) if len(gpus) > 1 else None
    for gpu in gpus:
        torch.cuda.synchronize(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
    status = "ok"
    try:
        with torch.inference_mode():
            target.generate(
                **inputs,
                max_new_tokens=workload.max_new_tokens,
                min_new_tokens=workload.max_new_tokens,
                do_sample=False,
            )
    except torch.cuda.OutOfMemoryError as error:
        status = f"oom: {str(error).splitlines()[0]}"
    outside = {gpu: bench_memory.outside_allocator(gpu) for gpu in gpus}
    measured = {
        gpu: torch.cuda.max_memory_reserved(gpu) - reserved_before[gpu] + outside[gpu]
        for gpu in gpus
    }
    allocated = {
        gpu: torch.cuda.max_memory_allocated(gpu) - before[gpu] + outside[gpu] for gpu in gpus
    }
    predicted = {gpu: plan.device(f"cuda:{gpu}").total for gpu in gpus}
    if pin is not None:
        pin.remove()
    del model, target, inputs
    gc.collect()
    torch.cuda.empty_cache()
    leftover = {gpu: torch.cuda.memory_allocated(gpu) - before[gpu] for gpu in gpus}
    return {
        "preset": preset,
        "attn": attn,
        "budgets": budgets,
        "workload": str(workload),
        "strategy": plan.strategy,
        "status": status,
        "left_allocated_after_gib": {f"cuda:{g}": round(b / GIB, 3) for g, b in leftover.items()},
        "devices": {
            f"cuda:{gpu}": {
                "predicted_gib": round(predicted[gpu] / GIB, 3),
                "measured_gib": round(measured[gpu] / GIB, 3),
                "error": round(predicted[gpu] / measured[gpu] - 1, 4),
                "allocated_gib": round(allocated[gpu] / GIB, 3),
                "outside_allocator_gib": round(outside[gpu] / GIB, 3),
            }
            for gpu in gpus
        },
    }


@pytest.mark.gpu
@pytest.mark.parametrize(("preset", "attn", "budgets", "work"), CASES)
def test_predicted_peak_matches_the_measured_one(
    preset: str,
    attn: str,
    budgets: dict[int, str],
    work: dict[str, Any],
    *,
    bench_models: ModuleType,
    bench_memory: ModuleType,
) -> None:
    import torch

    if len(budgets) > torch.cuda.device_count():
        pytest.skip(f"needs {len(budgets)} GPUs")
    result = _run(preset, attn, budgets, work, bench_models=bench_models, bench_memory=bench_memory)
    path = os.environ.get("OMNIFIX_PLANNER_RECORD")
    if path:
        import transformers

        result["stack"] = (
            f"transformers {transformers.__version__}, torch {torch.__version__}, "
            f"{torch.cuda.get_device_name(0)}"
        )
        result["allocator_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
    assert result["status"] == "ok", result
    for device, row in result["devices"].items():
        assert abs(row["error"]) <= TOLERANCE, (device, result)


_FRESH_PROCESS = """
import json, sys
import torch
import omnifix
from omnifix._plan.skeleton import build_skeleton
sys.path.insert(0, "benchmarks")
from _memory import outside_allocator
from _models import materialize, workload_inputs

torch.cuda.init()
torch.empty(1, device=0)
work = omnifix.Workload(text_tokens=1024, max_new_tokens=16)
plan = omnifix.plan_placement("qwen3-8b", workload=work, attn_implementation="sdpa")
before = outside_allocator(0)
model = materialize(build_skeleton("qwen3-8b"), {"": 0}).eval()
with torch.inference_mode():
    model.generate(**workload_inputs(model, work), max_new_tokens=16, do_sample=False)
print(json.dumps({"grew": outside_allocator(0) - before, "overhead": plan.devices[0].overhead}))
"""


@pytest.mark.gpu
def test_a_measured_budget_still_counts_the_kernels_loaded_after_it() -> None:
    # Free memory measured once CUDA has started has paid its context, not the kernels a first
    # generate loads later, outside the allocator: the plan must count those. A fresh process,
    # since this one has loaded its kernels already.
    import subprocess
    import sys

    from omnifix._plan.estimate import CALIBRATION

    root = Path(__file__).parents[2]
    done = subprocess.run(  # noqa: S603 - this test's own script
        [sys.executable, "-c", _FRESH_PROCESS],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["grew"] > 0
    assert figures["grew"] <= figures["overhead"] - CALIBRATION.workspace, figures
