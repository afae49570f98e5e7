"""How close is the planner's per-GPU peak to the measured one, next to two simpler estimates?

Run on a GPU machine with two GPUs (one GPU runs the 1-GPU cases and skips the others):

    PYTHONPATH=src python benchmarks/accuracy.py \
        --out benchmarks/results/accuracy-h200x2-tf5.17.json

Cases (``CASES``, 34): Qwen2.5-VL-7B, the Qwen2.5-Omni-7B thinker, the whole Qwen2.5-Omni-7B (talker
and token2wav loaded, generating text) and Qwen2-Audio-7B at full size with random weights in
bf16, over text 2k/8k/32k, images of 1280/4096 tokens, video of 15/30/60 s and audio of 30 s, with
sdpa and eager, on 1 and 2 GPUs: a covering selection in which every value of every axis appears,
both attentions run on 1 and on 2 GPUs, and each family runs on 1 and on 2 GPUs.

Per case:

- Budgets. 1 GPU: ``{0: "80GiB"}``. 2 GPUs: equal budgets small enough that no single GPU holds the
  model, derived from the 1-GPU plan of the same case: ``overhead + margin + f * (total -
  overhead)`` rounded up to a GiB (overhead: that plan's CUDA context and workspaces, margin: its
  safety margin; both are per GPU, so only the rest is scaled) and ``f`` the first of 0.6,
  0.7, 0.8, 0.9 whose plan is a split that fits (none: recorded as predicted not to fit).
- Each used GPU is capped at its budget with ``set_per_process_memory_fraction`` (allocator limit
  = budget - the CUDA context measured at start), so a wrong "fits" really runs out of memory.
- ``omnifix.plan_placement`` plans; the model is built on ``meta`` and given random weights on the
  plan's map (``materialize`` of ``_models.py``; rebuilt only when the preset or map changes, the
  attention is switched in place), then dispatched as ``load_safely`` does (``--hooks lean``:
  ``omnifix.lean_dispatch`` + ``pin_embeddings`` on several GPUs; or accelerate's hooks).
- ``generate``: the workload's prompt, 16 new tokens (``--new-tokens``), greedy, min = max.
- Per GPU: predicted total (and total + margin), measured peak (``max_memory_allocated`` + bytes
  outside the allocator), error = (predicted - measured) / measured, and two anchors for the same
  GPU: weights only (the bytes of weights the map puts there, what ``accelerate estimate-memory``
  reports for a whole model) and weights + KV cache (that GPU's decoder layers' KV cache for
  prompt + new tokens, 2 * kv_heads * head_dim * bytes per layer per token from the config, what
  hf-mem reports).
- Cases the planner predicts not to fit are recorded as such and not run.

The JSON's top-level ``summary`` holds median and worst |error| of omnifix and of each anchor over
every measured GPU, and the count of cases predicted to fit that ran out of memory.

Time on 2x H200 (estimate, not measured): ~15 model builds of 5-10 s, 34 generate calls of 1-5 s
(32k-token prefills the longest), planning < 1 s per case: about 4 minutes. ``--only`` keeps the
cases whose key contains one of its comma-separated parts (e.g. ``--only qwen2-audio,1gpu``).

``--tiny``: the same code paths on the cpu in seconds, with the tiny models of
``omnifix.testing`` and shrunken workloads; no caps, nothing measured (``measured`` is null).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _memory as mem
from _models import materialize
from _results import error_status, write_results

if TYPE_CHECKING:
    from torch import nn

    import omnifix

SUITE = "accuracy"
BUDGET_1GPU = 80 * mem.GIB
FACTORS = (0.6, 0.7, 0.8, 0.9)

#: Workloads by name (16 new tokens are added unless --new-tokens says otherwise).
WORKLOADS: dict[str, dict[str, Any]] = {
    "text-2k": {"text_tokens": 2048},
    "text-8k": {"text_tokens": 8192},
    "text-32k": {"text_tokens": 32768},
    "image-1280": {"text_tokens": 256, "image_tokens": 1280},
    "image-4096": {"text_tokens": 256, "image_tokens": 4096},
    "video-15s": {"text_tokens": 256, "video_seconds": 15},
    "video-30s": {"text_tokens": 256, "video_seconds": 30},
    "video-60s": {"text_tokens": 256, "video_seconds": 60},
    "audio-30s": {"text_tokens": 256, "audio_seconds": 30},
}

#: Model under test: (preset, part). "thinker": the Omni thinker alone; "model": the whole class.
MODELS: dict[str, tuple[str, str]] = {
    "qwen2.5-vl-7b": ("qwen2.5-vl-7b", "model"),
    "qwen2.5-omni-7b-thinker": ("qwen2.5-omni-7b", "thinker"),
    "qwen2.5-omni-7b": ("qwen2.5-omni-7b", "model"),
    "qwen2-audio-7b": ("qwen2-audio-7b", "model"),
}

_VL, _OT, _OW, _AU = MODELS
# (model, workload, attention, GPUs), grouped by model and GPU count so builds are reused.
CASES: list[tuple[str, str, str, int]] = [
    (_VL, "text-2k", "sdpa", 1),
    (_VL, "text-8k", "sdpa", 1),
    (_VL, "text-32k", "sdpa", 1),
    (_VL, "text-8k", "eager", 1),
    (_VL, "text-32k", "eager", 1),  # expected: predicted not to fit 80 GiB
    (_VL, "image-1280", "sdpa", 1),
    (_VL, "image-4096", "eager", 1),
    (_VL, "video-15s", "sdpa", 1),
    (_VL, "video-30s", "eager", 1),
    (_VL, "video-60s", "sdpa", 1),
    (_VL, "text-32k", "sdpa", 2),
    (_VL, "text-8k", "eager", 2),
    (_VL, "image-1280", "eager", 2),
    (_VL, "image-4096", "sdpa", 2),
    (_VL, "video-30s", "sdpa", 2),
    (_VL, "video-60s", "sdpa", 2),
    (_OT, "audio-30s", "sdpa", 1),
    (_OT, "audio-30s", "eager", 1),
    (_OT, "text-8k", "sdpa", 1),
    (_OT, "image-1280", "sdpa", 1),
    (_OT, "video-15s", "sdpa", 1),
    (_OT, "audio-30s", "sdpa", 2),
    (_OT, "text-32k", "sdpa", 2),
    (_OT, "video-30s", "eager", 2),
    (_OW, "audio-30s", "sdpa", 1),
    (_OW, "text-8k", "sdpa", 2),
    (_OW, "audio-30s", "eager", 2),
    (_AU, "audio-30s", "sdpa", 1),
    (_AU, "audio-30s", "eager", 1),
    (_AU, "text-8k", "sdpa", 1),
    (_AU, "text-32k", "sdpa", 1),
    (_AU, "text-2k", "eager", 2),
    (_AU, "audio-30s", "sdpa", 2),
    (_AU, "text-8k", "sdpa", 2),
]

METHOD = (
    "Full-size presets with random N(0, 0.02) bf16 weights placed by omnifix.plan_placement's map "
    "(benchmarks/_models.py materialize), dispatched as load_safely does; generate() greedy with "
    "min_new_tokens = max_new_tokens. Budgets: 1 GPU 80 GiB; 2 GPUs equal, overhead + margin + "
    "f x (total - overhead) of the 1-GPU plan rounded up to a GiB, f the first of 0.6/0.7/0.8/0.9 "
    "whose plan splits and fits. Each GPU capped at its budget with "
    "set_per_process_memory_fraction((budget - context) / total). "
    "Measured peak = max_memory_allocated + bytes outside the allocator (mem_get_info total - free "
    "- memory_reserved). error = (predicted - measured) / measured. Anchors per GPU: weights the "
    "map puts there (accelerate estimate-memory); weights + that GPU's decoder layers' KV cache "
    "for prompt + new tokens from the config (hf-mem)."
)


def case_key(model: str, work: str, attn: str, gpus: int) -> str:
    """``qwen2.5-vl-7b/text-8k/sdpa/1gpu``."""
    return f"{model}/{work}/{attn}/{gpus}gpu"


def selected_cases(*, tiny: bool, only: str = "") -> list[tuple[str, str, str, int]]:
    """The cases to run: ``--only`` filters by key; tiny drops models the transformers lacks."""
    parts = [part for part in only.split(",") if part]
    chosen = []
    for case in CASES:
        if parts and not any(part in case_key(*case) for part in parts):
            continue
        if tiny and mem.tiny_family(MODELS[case[0]][0]) is None:
            continue
        chosen.append(case)
    return chosen


def workload(name: str, *, new_tokens: int, tiny: bool) -> omnifix.Workload:
    """The named workload; tiny: shrunk to what the tiny models take in a second on a cpu."""
    import omnifix

    spec = dict(WORKLOADS[name])
    if tiny:
        spec["text_tokens"] = max(8, spec["text_tokens"] // 256)
        if "image_tokens" in spec:
            spec["image_tokens"] = max(4, spec["image_tokens"] // 256)
        if "video_seconds" in spec:
            spec["video_seconds"] = max(1, round(spec["video_seconds"] / 15))
            spec["video_tokens_per_second"] = 4
        if "audio_seconds" in spec:
            spec["audio_seconds"] = 0.3  # the tiny audio towers take at most 0.32 s
    return omnifix.Workload(max_new_tokens=new_tokens, **spec)


@dataclass
class _Built:
    key: tuple[str, str, tuple[tuple[str, int | str], ...]]
    model: nn.Module
    target: nn.Module
    placed: mem.Placed


class _Session:
    """Owns the one built model, so releasing it really frees its memory."""

    def __init__(self) -> None:
        self.built: _Built | None = None

    def release(self) -> None:
        if self.built is not None:
            mem.undispatch(self.built.model, self.built.placed)
        self.built = None
        mem.free_memory()


def _plan(
    planning: nn.Module, budgets: dict[int, int], attn: str, work: omnifix.Workload, dtype: Any
) -> omnifix.PlacementPlan:
    import omnifix

    return omnifix.plan_placement(
        planning, budgets=budgets, dtype=dtype, attn_implementation=attn, workload=work
    )


def _two_gpu_plan(
    planning: nn.Module, attn: str, work: omnifix.Workload, dtype: Any, unit: int
) -> tuple[omnifix.PlacementPlan, float, int]:
    """The 2-GPU plan with equal budgets derived from the 1-GPU plan (see the module doc)."""
    single = _plan(planning, {0: BUDGET_1GPU}, attn, work, dtype)
    row = single.device("cuda:0")
    fixed = row.overhead + row.margin
    first: tuple[omnifix.PlacementPlan, float, int] | None = None
    for factor in FACTORS:
        budget = mem.round_up(fixed + factor * (row.total - row.overhead), unit)
        plan = _plan(planning, {0: budget, 1: budget}, attn, work, dtype)
        first = first or (plan, factor, budget)
        if plan.fits and plan.strategy == "split":
            return plan, factor, budget
    if first is None:
        raise RuntimeError("no factor")  # FACTORS is not empty
    return first


def _case_plan(
    whole: nn.Module, part: str, n_gpus: int, *, attn: str, work: omnifix.Workload, tiny: bool
) -> tuple[omnifix.PlacementPlan, float | None]:
    """The case's plan and, on 2 GPUs, the budget factor it took."""
    import torch

    planner_model: Any = whole.thinker if part == "thinker" else whole  # type: ignore[union-attr]
    dtype = torch.float32 if tiny else torch.bfloat16
    if n_gpus == 1:
        return _plan(planner_model, {0: BUDGET_1GPU}, attn, work, dtype), None
    plan, factor, _ = _two_gpu_plan(planner_model, attn, work, dtype, 1024 if tiny else mem.GIB)
    return plan, factor


def _rows(
    plan: omnifix.PlacementPlan,
    built: _Built,
    work: omnifix.Workload,
    measured: dict[str, int],
    dtype_bytes: int,
) -> dict[str, dict[str, Any]]:
    tokens = (work.prompt_tokens + work.max_new_tokens) * work.batch_size
    weights = mem.weights_by_device(built.model, plan.device_map)
    kv = mem.kv_by_device(built.model, plan.device_map, tokens=tokens, dtype_bytes=dtype_bytes)

    def error(predicted: int, name: str) -> float | None:
        peak = measured.get(name)
        return None if not peak else round((predicted - peak) / peak, 4)

    rows: dict[str, dict[str, Any]] = {}
    for name in plan.devices_used:
        if not name.startswith("cuda"):
            continue
        row = plan.device(name)
        anchor_w = weights.get(name, 0)
        anchor_wkv = anchor_w + kv.get(name, 0)
        rows[name] = {
            "budget": row.budget,
            "predicted": row.total,
            "predicted_with_margin": row.total + row.margin,
            "phase": row.phase,
            "measured": measured.get(name),
            "error": error(row.total, name),
            "error_with_margin": error(row.total + row.margin, name),
            "weights_only": anchor_w,
            "weights_only_error": error(anchor_w, name),
            "weights_kv": anchor_wkv,
            "weights_kv_error": error(anchor_wkv, name),
        }
    return rows


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst |error| per estimate over every measured GPU, and fit-but-OOM count."""
    summary: dict[str, Any] = {}
    for label, field in (
        ("omnifix", "error"),
        ("omnifix_with_margin", "error_with_margin"),
        ("weights_only", "weights_only_error"),
        ("weights_kv", "weights_kv_error"),
    ):
        errors = [
            row[field]
            for case in cases
            if case.get("status") == "ok"
            for row in case.get("gpus", {}).values()
            if row.get(field) is not None
        ]
        summary[label] = {
            "gpus": len(errors),
            "median_abs_error": round(statistics.median(abs(e) for e in errors), 4)
            if errors
            else None,
            "worst_error": max(errors, key=abs) if errors else None,
        }
    summary["predicted_to_fit_but_oom"] = sum(
        1 for case in cases if case.get("predicted_fits") and str(case["status"]).startswith("oom")
    )
    summary["predicted_not_to_fit"] = sum(
        1 for case in cases if case.get("status") == "predicted not to fit"
    )
    summary["cases"] = len(cases)
    return summary


def _build(
    preset: str, part: str, device_map: dict[str, int | str], *, tiny: bool, hooks: str
) -> tuple[nn.Module, nn.Module, mem.Placed]:
    whole = mem.skeleton(preset, tiny=tiny)
    model: Any = whole.thinker if part == "thinker" else whole  # type: ignore[union-attr]
    placed_map = mem.on_cpu(device_map) if tiny else device_map
    materialize(model, placed_map)
    model.eval()
    mem.undispatch(model, None)  # materialize adds accelerate's hooks; dispatch as asked instead
    placed = mem.dispatch(model, placed_map, hooks=hooks)
    target = getattr(model, "thinker", model)
    return model, target, placed


def run_case(
    case: tuple[str, str, str, int],
    *,
    args: argparse.Namespace,
    session: _Session,
    contexts: dict[int, int],
    planning: dict[str, nn.Module],
) -> dict[str, Any]:
    """Plan, (re)build, cap, generate and compare one case; the build stays in ``session``."""
    import torch

    name, work_name, attn, n_gpus = case
    preset, part = MODELS[name]
    tiny = args.tiny
    dtype = torch.float32 if tiny else torch.bfloat16
    work = workload(work_name, new_tokens=args.new_tokens, tiny=tiny)
    record: dict[str, Any] = {
        "case": case_key(*case),
        "model": name,
        "preset": preset,
        "part": part,
        "workload_name": work_name,
        "workload": str(work),
        "attn": attn,
        "n_gpus": n_gpus,
        "hooks": args.hooks,
    }
    if not tiny and not args.plan_only and n_gpus > torch.cuda.device_count():
        record["status"] = f"skipped: needs {n_gpus} GPUs"
        return record
    if preset not in planning:
        planning[preset] = mem.skeleton(preset, tiny=tiny)
    plan, record["budget_factor"] = _case_plan(
        planning[preset], part, n_gpus, attn=attn, work=work, tiny=tiny
    )
    record["budgets"] = {
        row.device: row.budget for row in plan.devices if row.device.startswith("cuda")
    }
    record["strategy"] = plan.strategy
    record["predicted_fits"] = plan.fits
    record["device_map"] = plan.device_map
    if not plan.fits:
        record["status"] = "predicted not to fit"
        record["reason"] = plan.reason
        record["predicted"] = {row.device: row.total for row in plan.devices}
        return record
    if args.plan_only:
        record["status"] = "planned"
        record["predicted"] = {row.device: row.total for row in plan.devices}
        return record
    gpus = mem.gpus_of(plan.device_map)
    key = (preset, part, tuple(sorted(plan.device_map.items(), key=str)))
    if not tiny:
        mem.set_caps(dict.fromkeys(contexts), contexts)  # lift every cap while (re)building
    if session.built is None or session.built.key != key:
        session.release()  # the previous model must be gone before this one is measured
        model, target, placed = _build(preset, part, plan.device_map, tiny=tiny, hooks=args.hooks)
        session.built = _Built(key=key, model=model, target=target, placed=placed)
        del model, target, placed
        record["rebuilt"] = True
    built = session.built
    mem.set_attention(built.model, attn)
    if not tiny:
        record["caps"] = mem.set_caps(
            {gpu: (plan.device(f"cuda:{gpu}").budget if gpu in gpus else None) for gpu in contexts},
            contexts,
        )
    run = mem.run_generate(built.model, built.target, work, gpus=[] if tiny else gpus)
    record["status"] = run.status
    record["seconds"] = run.seconds
    record["allocated_before_run"] = run.before
    record["gpus"] = _rows(plan, built, work, run.peaks, dtype.itemsize)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated parts of case keys to keep")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--hooks", choices=("lean", "accelerate"), default="lean")
    parser.add_argument("--tiny", action="store_true", help="cpu smoke run with tiny models")
    parser.add_argument("--plan-only", action="store_true", help="plan every case, run none")
    args = parser.parse_args(argv)

    import torch

    contexts: dict[int, int] = {}
    if not args.tiny and not args.plan_only:
        contexts = mem.warm_up(range(torch.cuda.device_count()))
    method = METHOD + f" CUDA context per GPU at start: {contexts} bytes."
    cases: list[dict[str, Any]] = []
    session = _Session()
    planning: dict[str, nn.Module] = {}
    for case in selected_cases(tiny=args.tiny, only=args.only):
        try:
            record = run_case(
                case, args=args, session=session, contexts=contexts, planning=planning
            )
        except Exception as error:  # noqa: BLE001 - a failed case is a result to record
            record = {
                "case": case_key(*case),
                "status": error_status(error),
            }
            session.release()
        cases.append(record)
        print(json.dumps(record), flush=True)
        _write(args.out, method, cases)
    print(json.dumps({"summary": summarize(cases)}), flush=True)
    return 0


def _write(path: Path, method: str, cases: list[dict[str, Any]]) -> None:
    write_results(path, SUITE, method, cases, summary=summarize(cases))


if __name__ == "__main__":
    raise SystemExit(main())
