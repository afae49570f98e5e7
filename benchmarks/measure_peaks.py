"""Measure GPU memory peaks of full-size presets with random weights (planner calibration data).

Run on a GPU machine, one GPU:

    PYTHONPATH=src python benchmarks/measure_peaks.py --out benchmarks/results/peaks.json

For each preset the model is built from its published config on the GPU (parameters drawn from
N(0, 0.02); buffers as transformers computes them), then each case runs ``generate`` once. We record
the bytes allocated by the weights, and the peak above them: for the vision/audio tower phase
(reset before the tower, read after it) and for the language-model phase (reset after the towers),
plus the CUDA context (device total - free before the first allocation). An OOM is a result too.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from _memory import set_attention
from _models import workload_inputs

import omnifix
from omnifix._plan.skeleton import build_skeleton

GIB = 2**30

# (preset, attention, workload). Video: 256 tokens per second = 448x448 frames at 2 frames/s.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    *[("qwen2.5-vl-7b", "sdpa", {"text_tokens": n}) for n in (2048, 8192, 16384, 32768)],
    ("qwen2.5-vl-7b", "sdpa", {"text_tokens": 8192, "batch_size": 2}),
    ("qwen2.5-vl-7b", "sdpa", {"text_tokens": 8192, "max_new_tokens": 256}),
    *[("qwen2.5-vl-7b", "eager", {"text_tokens": n}) for n in (2048, 8192, 16384)],
    *[
        ("qwen2.5-vl-7b", attn, {"text_tokens": 256, "image_tokens": n})
        for n in (1280, 4096)
        for attn in ("sdpa", "eager")
    ],
    ("qwen2.5-vl-7b", "sdpa", {"text_tokens": 256, "video_seconds": 15}),
    ("qwen2.5-vl-7b", "sdpa", {"text_tokens": 256, "video_seconds": 30}),
    ("qwen2.5-vl-7b", "eager", {"text_tokens": 256, "video_seconds": 15}),
    ("qwen2-vl-7b", "sdpa", {"text_tokens": 256, "image_tokens": 1280}),
    ("qwen2-vl-7b", "eager", {"text_tokens": 256, "image_tokens": 1280}),
    ("qwen2-vl-7b", "sdpa", {"text_tokens": 8192}),
    ("qwen2-audio-7b", "sdpa", {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2-audio-7b", "eager", {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2-audio-7b", "sdpa", {"text_tokens": 8192}),
    ("qwen2.5-omni-7b", "sdpa", {"text_tokens": 8192}),
    ("qwen2.5-omni-7b", "sdpa", {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2.5-omni-7b", "eager", {"text_tokens": 256, "audio_seconds": 30}),
    ("qwen2.5-omni-7b", "sdpa", {"text_tokens": 256, "image_tokens": 1280}),
]


def _build(preset: str, attn: str, device: torch.device) -> Any:
    """The preset on ``device`` in bf16 (Omni: the thinker alone), random N(0, 0.02) weights."""
    skeleton = build_skeleton(preset)
    model = getattr(skeleton, "thinker", skeleton)
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    model.eval()
    set_attention(model, attn)
    return model


def _towers(model: Any) -> list[Any]:
    names = ("visual", "audio_tower")
    found = []
    for name in names:
        module = getattr(model, name, None) or getattr(getattr(model, "model", None), name, None)
        if module is not None:
            found.append(module)
    return found


def _measure(model: Any, inputs: dict[str, Any], max_new: int) -> dict[str, Any]:
    device = inputs["input_ids"].device
    tower_peaks: list[int] = []

    def before(*_: Any) -> None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def after(*_: Any) -> None:
        torch.cuda.synchronize(device)
        tower_peaks.append(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)

    handles = []
    for tower in _towers(model):
        handles.append(tower.register_forward_pre_hook(before))
        handles.append(tower.register_forward_hook(after))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
            )
        torch.cuda.synchronize(device)
        status = "ok"
        new_tokens = int(out.shape[-1] - inputs["input_ids"].shape[-1])
    except torch.cuda.OutOfMemoryError as error:
        status = f"oom: {str(error).splitlines()[0]}"
        new_tokens = 0
    finally:
        for handle in handles:
            handle.remove()
    lm_peak = torch.cuda.max_memory_allocated(device)
    return {
        "status": status,
        "seconds": round(time.perf_counter() - start, 3),
        "new_tokens": new_tokens,
        "weights_bytes": base,
        "tower_peak_above_weights": (max(tower_peaks) - base) if tower_peaks else None,
        "lm_peak_above_weights": lm_peak - base,
        "peak_above_weights": max([lm_peak, *tower_peaks]) - base,
        "reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def main() -> None:
    import accelerate
    import transformers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated presets to run")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    free, total = torch.cuda.mem_get_info(device)
    torch.empty(1, device=device)
    free_after_init, _ = torch.cuda.mem_get_info(device)
    meta = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "total_bytes": total,
        "context_bytes": total - free_after_init,
        "free_before_init": free,
    }
    results: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    model: Any = None
    current: tuple[str, str] | None = None
    for preset, attn, work in CASES:
        if only and preset not in only:
            continue
        workload = omnifix.Workload(**{"max_new_tokens": 1, **work})
        case: dict[str, Any] = {"preset": preset, "attn": attn, "workload": str(workload)}
        try:
            if current is None or current[0] != preset:
                model = None
                gc.collect()
                torch.cuda.empty_cache()
                model = _build(preset, attn, device)
                current = (preset, attn)
            elif current[1] != attn:
                set_attention(model, attn)
                current = (preset, attn)
            inputs = workload_inputs(model, workload, device=device)
            case["input_tokens"] = int(inputs["input_ids"].shape[-1])
            case.update(_measure(model, inputs, workload.max_new_tokens))
            del inputs
        except Exception as error:  # noqa: BLE001 - a failed case is a result to record
            case["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        results.append(case)
        print(json.dumps(case), flush=True)
        args.out.write_text(json.dumps({"machine": meta, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
