"""Wall time of what omnifix adds: planning, the post-load checks, and ``load_safely`` itself.

Run on the GPU machine for absolute numbers (it also runs on a cpu-only machine, GPU cases
skipped):

    PYTHONPATH=src python benchmarks/timing.py --out benchmarks/results/timing-h200x2-tf5.17.json

Three parts (``--only plan,checks,load`` picks some):

plan
    ``plan_placement`` of the 7B presets (qwen2.5-vl-7b, qwen2.5-omni-7b, qwen2-audio-7b), bf16,
    sdpa, 1024 text tokens + 64 new ones, budgets of 24 GiB per GPU (fits one GPU) and 12 GiB
    per GPU (splits), computed on the cpu (simulated GPUs). *Cold*: the first call in a fresh
    subprocess (``CUDA_VISIBLE_DEVICES=""``), the imports of torch, transformers, accelerate and
    omnifix measured separately; and the same with the model's transformers class imported
    before the clock starts (``from_pretrained`` imports it too): most of a first call is
    transformers' lazy import of the model code (3.0 of 3.1 s for the tiny Qwen2.5-VL on the
    development machine's cpu, profiled). *Warm*: median of ``--repeats`` (10) calls in this process
    (omnifix caches the skeleton of a config), and of the same number with that cache emptied
    before each call. Target: cold <= 1 s.
checks
    ``assert_no_meta``, ``input_device``, ``find_meta_tensors`` and ``placement_report``, each
    and all four in a row, median of ``--check-repeats`` (20): on the whole Qwen2.5-Omni-7B
    (thinker + talker + token2wav, 10.7B parameters) on the meta device on the cpu (where
    ``assert_no_meta`` raises, which is timed too), then the same model given storage on cuda:0
    with ``to_empty`` (values do not matter), then (2 GPUs) split over both by a plan map behind
    accelerate's hooks, and behind ``lean_dispatch``. Target: <= 100 ms on the GPU.
load
    ``load_safely`` against a plain ``from_pretrained`` with the same explicit ``device_map``,
    dtype (bf16) and attention (sdpa): a full-size Qwen2.5-VL-3B with random weights is written
    with ``save_pretrained`` into a temporary directory under ``--workdir``; each loader gets one
    untimed warm load, then ``--loads`` (3) timed loads each, alternating (ABBA order), GPUs
    synchronized, the model deleted and the CUDA cache emptied between loads. On one GPU, and on
    two with ``max_memory`` of 5 GiB per GPU for ``load_safely`` (which splits) and its map for
    ``from_pretrained``. Reported: each loader's median, every pair's ratio and the median ratio.
    Target: <= 1.02x.

Time on 2x H200 (estimate, not measured): plan ~1.8 min (12 subprocesses of ~7 s: two per case,
the second with the model class imported first, so the plan's own cold cost shows apart from
transformers' lazy import of the model code; plus 2 x 10 warm calls per case), checks ~40 s
(a 10.7B skeleton, 4 placements x 5 x 20 calls), load ~2.5 min (7.5 GB written once; where
``load_safely`` takes ``hooks=``, "lean" and "accelerate" are both compared: 4 comparisons x 8
loads of ~4 s): ~5 min in all, under the 8 min asked. ``--only`` runs some parts.

``--tiny`` runs the same code on the cpu in seconds with the tiny models of ``omnifix.testing``
(a tiny checkpoint saved by ``save_tiny_model``); no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _memory import free_memory
from _models import gpu_index, materialize
from _results import error_status, write_results
from _timing import place, print_case, spread, timed, tiny_threads

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

SUITE = "timing"
PARTS = ("plan", "checks", "load")
PLAN_PRESETS = ("qwen2.5-vl-7b", "qwen2.5-omni-7b", "qwen2-audio-7b")
PLAN_BUDGETS = ("24GiB", "12GiB")
#: The tiny families standing in for the presets in --tiny mode, by preference: the first one
#: the installed transformers has (Qwen2.5 families need 4.49 / 4.52).
TINY_PLAN = ("qwen2.5-vl", "qwen2-vl")
TINY_CHECKS = ("qwen2.5-omni", "qwen2-audio")
TINY_LOAD = ("qwen2.5-vl", "qwen2-vl")
LOAD_PRESET = "qwen2.5-vl-3b"
#: Per-GPU cap that makes load_safely split Qwen2.5-VL-3B over two GPUs (7.7 GiB on one).
SPLIT_CAP = "5GiB"
CHECKS_SPLIT_BUDGET = "14GiB"  # splits the whole Qwen2.5-Omni-7B (21.8 GiB on one GPU)

# The cold call: a fresh interpreter; imports timed on their own, then the first plan.
_COLD = """
import json, sys, time
start = time.perf_counter()
import torch, transformers, accelerate
import omnifix
spec = json.loads(sys.argv[1])
for name in spec["preimport"]:  # the model class: from_pretrained would import it too
    getattr(transformers, name)
imported = time.perf_counter()
plan = omnifix.plan_placement(
    spec["model"], budgets={0: spec["budget"], 1: spec["budget"]},
    dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa",
    workload=omnifix.Workload(**spec["workload"]),
)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "cold_s": done - imported,
                  "strategy": plan.strategy}))
"""


def tiny_family(preferences: tuple[str, ...]) -> str:
    """The first of ``preferences`` the installed transformers supports."""
    import omnifix.testing as ot

    available = set(ot.available_families())
    return next(family for family in preferences if family in available)


def method(args: argparse.Namespace) -> str:
    """The method line of the results file."""
    mode = "tiny models on the cpu" if args.tiny else "full-size presets"
    return (
        f"{mode}; plan: cold = first plan_placement in a fresh subprocess (imports timed "
        f"apart), warm = median of {args.repeats}; checks: median of {args.check_repeats} per "
        f"function; load: 1 warm + {args.loads} timed loads per loader, alternating ABBA, "
        "synchronize + del + empty_cache between; ratio = load_safely / from_pretrained"
    )


class _Recorder:
    """Collects cases, rewrites the results file after each, prints one JSON line per case."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cases: list[dict[str, Any]] = []

    def add(self, case: dict[str, Any]) -> None:
        self.cases.append(case)
        print_case(case)
        write_results(self.args.out, SUITE, method(self.args), self.cases)

    def skip(self, case: dict[str, Any], why: str) -> None:
        self.add({**case, "status": f"skipped: {why}"})

    def run(self, case: dict[str, Any], body: Callable[[dict[str, Any]], None]) -> None:
        """Fill ``case`` with ``body``; an exception (OOM included) becomes its status."""
        try:
            body(case)
            case.setdefault("status", "ok")
        except Exception as error:  # noqa: BLE001 - a failed case is a result to record
            case["status"] = error_status(error)
        finally:
            free_memory()
        self.add(case)


def _ms(values: list[float]) -> dict[str, Any]:
    return spread([value * 1000 for value in values])


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------


def _cold(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the first plan_placement in a fresh interpreter (cpu only); its timings."""
    import omnifix

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    src = str(Path(omnifix.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _COLD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cold subprocess exited {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _plan_cases(args: argparse.Namespace, record: _Recorder, workdir: Path) -> None:
    import torch

    import omnifix
    from omnifix._plan import skeleton as _skeleton

    if args.tiny:
        import omnifix.testing as ot

        family = tiny_family(TINY_PLAN)
        path = ot.save_tiny_model(family, workdir / f"tiny-{family}")
        name = ot.model_class(family).__name__
        targets = [(f"tiny {family}", str(path), name, "float32", ("24GiB",))]
        workload = {"text_tokens": 32, "max_new_tokens": 8}
    else:
        from omnifix._plan.presets import preset_model_class

        targets = [
            (preset, preset, preset_model_class(preset).__name__, "bfloat16", PLAN_BUDGETS)
            for preset in PLAN_PRESETS
        ]
        workload = {"text_tokens": 1024, "max_new_tokens": 64}
    for label, model, class_name, dtype, budgets in targets:
        for budget in budgets:
            case: dict[str, Any] = {
                "part": "plan",
                "case": f"plan {label} {budget}x2",
                "model": label,
                "budgets": {"0": budget, "1": budget},
                "workload": workload,
            }

            def body(
                case: dict[str, Any], model: str = model, name: str = class_name, dtype: str = dtype
            ) -> None:
                spec = {
                    "model": model,
                    "budget": case["budgets"]["0"],
                    "dtype": dtype,
                    "workload": workload,
                }
                cold = _cold({**spec, "preimport": []})
                warm_class = _cold({**spec, "preimport": [name]})
                case.update(
                    strategy=cold["strategy"],
                    cold_ms=round(cold["cold_s"] * 1000, 1),
                    import_ms=round(cold["import_s"] * 1000, 1),
                    cold_class_imported_ms=round(warm_class["cold_s"] * 1000, 1),
                    import_with_class_ms=round(warm_class["import_s"] * 1000, 1),
                )

                def call() -> Any:
                    return omnifix.plan_placement(
                        model,
                        budgets={0: spec["budget"], 1: spec["budget"]},
                        dtype=getattr(torch, dtype),
                        attn_implementation="sdpa",
                        workload=omnifix.Workload(**workload),
                    )

                call()  # fills this process's skeleton cache
                case["warm_ms"] = _ms([timed(call).seconds for _ in range(args.repeats)])

                def uncached() -> Any:
                    _skeleton._CACHE.clear()  # noqa: SLF001 - time a rebuild of the skeleton
                    return call()

                case["warm_uncached_ms"] = _ms(
                    [timed(uncached).seconds for _ in range(args.repeats)]
                )
                case["target_ms"] = 1000
                case["meets_target"] = case["cold_ms"] <= 1000

            record.run(case, body)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _check_functions() -> dict[str, Callable[[nn.Module], Any]]:
    import omnifix

    def assert_no_meta(model: nn.Module) -> str:
        try:
            omnifix.assert_no_meta(model)
        except omnifix.MetaTensorError:
            return "raised MetaTensorError"
        return "passed"

    def input_device(model: nn.Module) -> str:
        try:
            return str(omnifix.input_device(model))
        except omnifix.OmnifixError as error:
            return f"raised {type(error).__name__}"

    def find_meta_tensors(model: nn.Module) -> str:
        return f"{len(omnifix.find_meta_tensors(model).tensors)} meta tensors"

    def placement_report(model: nn.Module) -> str:
        return omnifix.placement_report(model).strategy

    return {
        "assert_no_meta": assert_no_meta,
        "input_device": input_device,
        "find_meta_tensors": find_meta_tensors,
        "placement_report": placement_report,
    }


def _time_checks(model: nn.Module, repeats: int) -> dict[str, Any]:
    """Median (and spread) ms of each check and of all four in a row; what each returned."""
    functions = _check_functions()
    out: dict[str, Any] = {"outcome": {}, "ms": {}}
    for name, function in functions.items():
        out["outcome"][name] = function(model)  # warm-up, and what it says
        out["ms"][name] = _ms([timed(lambda f=function: f(model)).seconds for _ in range(repeats)])

    def everything() -> None:
        for function in functions.values():
            function(model)

    out["ms"]["all"] = _ms([timed(everything).seconds for _ in range(repeats)])
    return out


def _checks_skeleton(args: argparse.Namespace) -> nn.Module:
    """The whole model on ``meta``: Qwen2.5-Omni-7B (10.7B parameters), or its tiny stand-in."""
    import torch

    if args.tiny:
        import omnifix.testing as ot
        from omnifix._plan.skeleton import build_on_meta

        family = tiny_family(TINY_CHECKS)
        cls = ot.model_class(family)
        return build_on_meta(ot.tiny_config(family), cls, torch.float32)
    from omnifix._plan.skeleton import build_skeleton

    model: nn.Module = build_skeleton("qwen2.5-omni-7b")
    return model


def _checks_on(case: dict[str, Any], model: nn.Module, device: str | None, repeats: int) -> None:
    """Time the checks on ``model``, first given storage on ``device`` when one is named."""
    if device is not None:
        model.to_empty(device=device)  # storage on the device; values do not matter here
        case["device"] = device
    case["parameters"] = sum(p.numel() for p in model.parameters())
    case["modules"] = sum(1 for _ in model.modules())
    case["tensors"] = sum(1 for _ in (*model.parameters(), *model.buffers()))
    case.update(_time_checks(model, repeats))
    if device is not None:
        case["target_ms"] = 100
        case["meets_target"] = case["ms"]["all"]["median"] <= 100


def _checks_cases(args: argparse.Namespace, record: _Recorder) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    label = f"tiny {tiny_family(TINY_CHECKS)}" if args.tiny else "qwen2.5-omni-7b"
    holder: list[nn.Module] = []

    def model() -> nn.Module:
        if not holder:
            holder.append(_checks_skeleton(args))
        return holder[0]

    record.run(
        {"part": "checks", "case": f"checks {label} meta (cpu)"},
        lambda case: _checks_on(case, model(), None, args.check_repeats),
    )
    device = "cpu" if args.tiny else "cuda:0"
    if not args.tiny and gpus < 1:
        record.skip({"part": "checks", "case": f"checks {label} cuda:0"}, "no GPU")
        return
    record.run(
        {"part": "checks", "case": f"checks {label} {device}"},
        lambda case: _checks_on(case, model(), device, args.check_repeats),
    )
    for hooks in ("accelerate", "lean"):
        case = {"part": "checks", "case": f"checks {label} split {hooks}"}
        if gpus < 2 and not args.tiny:
            record.skip(case, "needs 2 GPUs")
            continue
        record.run(case, lambda case, hooks=hooks: _split_checks(case, model(), hooks, args))
    holder.clear()


def _split_checks(
    case: dict[str, Any], model: nn.Module, hooks: str, args: argparse.Namespace
) -> None:
    """The checks on the model split over two GPUs by a plan map, behind ``hooks``.

    ``--tiny``: the tiny model's plan (one device) with the cpu for every GPU: the same code,
    nothing split.
    """
    import torch
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    import omnifix

    if args.tiny:
        import omnifix.testing as ot

        plan = omnifix.plan_placement(
            ot.tiny_config(tiny_family(TINY_CHECKS)),
            model_class=ot.model_class(tiny_family(TINY_CHECKS)),
            budgets={0: "24GiB", 1: "24GiB"},
            dtype=torch.float32,
            attn_implementation="sdpa",
            workload=omnifix.Workload(text_tokens=32, max_new_tokens=8),
        )
    else:
        plan = omnifix.plan_placement(
            "qwen2.5-omni-7b",
            budgets={0: CHECKS_SPLIT_BUDGET, 1: CHECKS_SPLIT_BUDGET},
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            workload=omnifix.Workload(text_tokens=1024, max_new_tokens=64),
        )
    device_map = {
        name: "cpu" if args.tiny and gpu_index(value) is not None else value
        for name, value in plan.device_map.items()
    }
    case.update(strategy=plan.strategy, devices=sorted({str(v) for v in device_map.values()}))
    place(model, device_map)
    if hooks == "accelerate":
        dispatch_model(model, device_map=device_map)
        case["hooks"] = sum(hasattr(m, "_hf_hook") for m in model.modules())
        try:
            case.update(_time_checks(model, args.check_repeats))
        finally:
            remove_hook_from_module(model, recurse=True)
    else:
        model.hf_device_map = device_map
        handle = omnifix.lean_dispatch(model, device_map=device_map)
        pin = omnifix.pin_embeddings(model) if len(set(device_map.values())) > 1 else None
        count = handle.hooks
        case["hooks"] = count if isinstance(count, int) else len(count)
        try:
            case.update(_time_checks(model, args.check_repeats))
        finally:
            if pin is not None:
                pin.remove()
            handle.remove()
    model.__dict__.pop("hf_device_map", None)
    case["meets_target"] = case["ms"]["all"]["median"] <= 100


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _save_checkpoint(args: argparse.Namespace, workdir: Path) -> tuple[Path, type]:
    """A checkpoint on disk to load: full-size Qwen2.5-VL-3B with random weights, or tiny."""
    import omnifix.testing as ot

    if args.tiny:
        family = tiny_family(TINY_LOAD)
        return ot.save_tiny_model(family, workdir / "load"), ot.model_class(family)
    from omnifix._plan.presets import preset_model_class
    from omnifix._plan.skeleton import build_skeleton

    path = workdir / LOAD_PRESET
    model = build_skeleton(LOAD_PRESET)
    materialize(model, {"": 0})
    model.save_pretrained(path)
    del model
    free_memory()
    return path, preset_model_class(LOAD_PRESET)


def _loaders(
    path: Path, cls: type, safely: dict[str, Any], args: argparse.Namespace
) -> tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]:
    """(load_safely, from_pretrained with load_safely's map, facts); one warm load of each."""
    import torch

    import omnifix
    from omnifix._compat import dtype_keyword

    dtype = torch.float32 if args.tiny else torch.bfloat16
    workload = omnifix.Workload(
        text_tokens=32 if args.tiny else 1024, max_new_tokens=8 if args.tiny else 64
    )

    def load_safely() -> Any:
        return omnifix.load_safely(
            path,
            model_class=cls,
            dtype=dtype,
            attn_implementation="sdpa",
            workload=workload,
            **safely,
        )

    warm = load_safely()  # untimed warm load; its map is the one from_pretrained gets
    device_map = dict(getattr(warm, "hf_device_map", None) or {"": str(omnifix.input_device(warm))})
    report = omnifix.placement_report(warm)
    facts = {
        "device_map_entries": len(device_map),
        "devices": sorted({str(v) for v in device_map.values()}),
        "strategy": report.strategy,
        "parameters": sum(p.numel() for p in warm.parameters()),
    }
    del warm, report
    free_memory()
    keyword = dtype_keyword()

    def from_pretrained() -> Any:
        return cls.from_pretrained(  # type: ignore[attr-defined]
            path, device_map=device_map, attn_implementation="sdpa", **{keyword: dtype}
        )

    warm = from_pretrained()  # untimed warm load
    del warm
    free_memory()
    return load_safely, from_pretrained, facts


def _alternate(
    first: Callable[[], Any], second: Callable[[], Any], loads: int
) -> tuple[list[float], list[float]]:
    """``loads`` timed loads of each, ABBA order; the model dropped between loads."""
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(loads):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            loader = (first, second)[which]
            result = timed(loader)
            times[which].append(result.seconds)
            del result
            free_memory()
    return times


def _load_setups(args: argparse.Namespace, gpus: int) -> list[tuple[str, dict[str, Any], str]]:
    """(name, load_safely keywords, why it cannot run here or "")."""
    if args.tiny:
        return [("cpu", {"device": "cpu"}, "")]
    split = {"device": "cuda", "max_memory": {0: SPLIT_CAP, 1: SPLIT_CAP}}
    return [
        ("1 GPU", {"device": "cuda:0"}, "" if gpus >= 1 else "needs 1 GPU"),
        ("2 GPUs split", split, "" if gpus >= 2 else "needs 2 GPUs"),
    ]


def _compare(
    case: dict[str, Any], saved: dict[str, Any], options: dict[str, Any], args: argparse.Namespace
) -> None:
    """Alternate timed loads of load_safely(**options) and from_pretrained with its map."""
    safely, plain, facts = _loaders(saved["path"], saved["cls"], options, args)
    case.update(facts)
    safe_s, plain_s = _alternate(safely, plain, args.loads)
    ratios = [a / b for a, b in zip(safe_s, plain_s, strict=True)]
    case.update(
        load_safely_s=spread(safe_s),
        from_pretrained_s=spread(plain_s),
        ratios=[round(r, 4) for r in ratios],
        median_ratio=round(statistics.median(ratios), 4),
        target_ratio=1.02,
        meets_target=statistics.median(ratios) <= 1.02,
    )


def _load_cases(args: argparse.Namespace, record: _Recorder, workdir: Path) -> None:
    import torch

    import omnifix

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    setups = _load_setups(args, gpus)
    for name, _, why in setups:
        if why:
            record.skip({"part": "load", "case": f"load {name}"}, why)
    if all(why for _, _, why in setups):
        return
    saved: dict[str, Any] = {}

    def save(case: dict[str, Any]) -> None:
        start = time.perf_counter()
        saved["path"], saved["cls"] = _save_checkpoint(args, workdir)
        case["save_s"] = round(time.perf_counter() - start, 2)
        files = [f for f in saved["path"].rglob("*") if f.is_file()]
        case["checkpoint_bytes"] = sum(f.stat().st_size for f in files)

    record.run({"part": "load", "case": "load save checkpoint"}, save)
    if "path" not in saved:
        return
    variants: list[dict[str, Any]] = [{}]
    if "hooks" in inspect.signature(omnifix.load_safely).parameters:
        variants = [{"hooks": "lean"}, {"hooks": "accelerate"}]
    for name, kwargs, why in setups:
        if why:
            continue
        for variant in variants:
            options = {**kwargs, **variant}
            suffix = f" hooks={variant['hooks']}" if variant else ""
            case = {
                "part": "load",
                "case": f"load {name}{suffix}",
                "load_safely_kwargs": {key: str(value) for key, value in options.items()},
            }
            record.run(case, lambda case, options=options: _compare(case, saved, options, args))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--repeats", type=int, default=10, help="warm plan calls")
    parser.add_argument("--check-repeats", type=int, default=20)
    parser.add_argument("--loads", type=int, default=3, help="timed loads per loader")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the cpu, seconds")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if args.tiny:
        args.repeats = min(args.repeats, 3)
        args.check_repeats = min(args.check_repeats, 3)
        args.loads = min(args.loads, 2)
    record = _Recorder(args)
    write_results(args.out, SUITE, method(args), [])
    with (
        tiny_threads(args.tiny),
        tempfile.TemporaryDirectory(prefix="omnifix-timing-", dir=args.workdir) as tmp,
    ):
        workdir = Path(tmp)
        if "plan" in parts:
            _plan_cases(args, record, workdir)
        if "checks" in parts:
            _checks_cases(args, record)
        if "load" in parts:
            _load_cases(args, record, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
