"""How large an input fits on two 24 GiB GPUs: transformers' device_map words against omnifix.

Run on a GPU machine with two GPUs (more are ignored):

    PYTHONPATH=src python benchmarks/capacity.py \
        --out benchmarks/results/capacity-h200x2-tf5.17.json

Both GPUs are capped at 24 GiB (``set_per_process_memory_fraction((24 GiB - CUDA context) /
total)``, so allocator + context stay within a 24 GiB card). Kinds of input (``KINDS``), bf16, sdpa,
16 new tokens (greedy, min = max):

- ``vl-text``: Qwen2.5-VL-7B, a text prompt of N tokens (searched in steps of 128, <= 128k);
- ``vl-image``: Qwen2.5-VL-7B, one image of N tokens (steps of 64, <= 16384 tokens = 64k
  patches) + 256 text tokens;
- ``vl-video``: Qwen2.5-VL-7B, N seconds of 448x448 video (steps of 1 s, <= 600 s) + 256 text;
- ``audio-text``: Qwen2-Audio-7B, a text prompt of N tokens (steps of 128, <= 128k); its
  ``generate`` computes logits for the whole prompt, so where ``lm_head`` sits matters.

Placements (``PLACEMENTS``):

- ``auto``, ``balanced``, ``balanced_low_0``: the maps transformers itself computes for those
  words on two 24 GiB cards. We reproduce ``from_pretrained(device_map=word)`` without a
  checkpoint by calling the function it calls, ``transformers.integrations.accelerate.
  _get_device_map`` (5.x; ``transformers.modeling_utils._get_device_map`` on 4.5x), on the model
  built on ``meta``, with ``max_memory`` = what accelerate would read on a real 24 GiB card: 24 GiB
  minus the CUDA context measured here (plus the host's available memory for ``cpu``). Where
  neither exists (4.45) accelerate's ``get_balanced_memory`` + ``infer_auto_device_map`` with the
  model's ``_no_split_modules``, which is what those versions inline. One map per word, whatever
  the input size. Dispatched with accelerate's ``dispatch_model``, as ``from_pretrained`` does.
- ``omnifix``: ``plan_placement(preset, budgets={0: "24GiB", 1: "24GiB"}, workload=<that size>)``;
  its map can change with the size. Dispatched as ``load_safely`` does (``omnifix.lean_dispatch``
  + ``pin_embeddings``). Its capacity is the largest size whose plan fits *and* that runs; a size
  whose plan fits but runs out of memory is recorded as a prediction failure.

Search, per (kind, placement): from a start size, double until a size fails (or the bound is
reached), halving instead when the start fails, then bisect until the gap between the largest size
that ran and the smallest that failed is <= 3 % of the former (resolution: 3 %, and at least one
step). For ``omnifix`` the plan is searched first (planning is free), and runs start at the
largest size the plan accepts. Every probe builds the inputs, runs ``generate``, and records each
GPU's peak (``max_memory_allocated`` + bytes outside the allocator); at each capacity we keep the
per-GPU peaks and their imbalance (max / min). The JSON's top-level ``summary`` gives each kind's
capacities and the omnifix / auto ratio.

One model per preset is built once (random weights) and moved between maps: hooks removed
(accelerate's ``remove_hook_from_submodules``, lean hooks and pins undone), ``module.to(device)``
per map entry, then dispatched again. Probes of an identical map (and hook style) and size are run
once; a word whose map equals an earlier word's reuses its whole result (``reused_from``).

Time on 2x H200 (estimate, not measured): ~10 runs per word search (the first doubles from the
start, later ones start at the previous capacity), ~1-2 per omnifix search, 2-5 s per run at the
largest sizes (a 64k-token prefill of a 7B model), 2 model builds: about 5 minutes. A deadline
(``--deadline``, default 420 s) stops probing and records what was found so far as ``cut short``.
``--only`` keeps the kinds/placements whose ``kind/placement`` key contains one of its parts.

``--tiny``: the same code paths on the cpu in seconds, with the tiny models of ``omnifix.testing``
and small bounds (no caps, no OOM: every search ends at its bound).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _memory as mem
from _models import materialize
from _results import error_status, write_results

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from torch import nn

    import omnifix

SUITE = "capacity"
CAP = 24 * mem.GIB
RESOLUTION = 0.03
WORDS = ("auto", "balanced", "balanced_low_0")
PLACEMENTS = (*WORDS, "omnifix")


@dataclass(frozen=True)
class Kind:
    """One kind of input: the preset, what N counts and the search's sizes (in units of step)."""

    preset: str
    unit: str
    step: int
    start: int
    lowest: int
    highest: int
    #: The same, for --tiny (step 1).
    tiny_start: int
    tiny_highest: int

    def workload(self, size: int, *, new_tokens: int, tiny: bool) -> omnifix.Workload:
        """The workload of ``size`` units (tiny: 8 text tokens instead of 256 beside media)."""
        import omnifix

        text = 8 if tiny else 256
        if self.unit == "text tokens":
            return omnifix.Workload(text_tokens=size, max_new_tokens=new_tokens)
        if self.unit == "image tokens":
            return omnifix.Workload(text_tokens=text, image_tokens=size, max_new_tokens=new_tokens)
        return omnifix.Workload(
            text_tokens=text,
            video_seconds=size,
            max_new_tokens=new_tokens,
            video_tokens_per_second=4 if tiny else 256,
        )


KINDS: dict[str, Kind] = {
    "vl-text": Kind("qwen2.5-vl-7b", "text tokens", 128, 16384, 256, 131072, 16, 64),
    "vl-image": Kind("qwen2.5-vl-7b", "image tokens", 64, 2048, 64, 16384, 4, 16),
    "vl-video": Kind("qwen2.5-vl-7b", "video seconds", 1, 64, 1, 600, 1, 2),
    "audio-text": Kind("qwen2-audio-7b", "text tokens", 128, 8192, 256, 131072, 16, 64),
}


class OutOfTimeError(Exception):
    """The suite's deadline passed: stop probing, keep what was found."""


def largest(
    runs: Callable[[int], bool],
    *,
    start: int,
    lowest: int,
    highest: int,
    resolution: float = RESOLUTION,
) -> int | None:
    """The largest ``n`` in ``[lowest, highest]`` with ``runs(n)``, assuming it is monotone.

    Doubles from ``start`` until a size fails (halves while the start fails), then bisects until
    the gap between the largest size that ran and the smallest that failed is at most
    ``resolution`` of the former (and at least 1). ``None`` when even ``lowest`` fails.
    """
    size = min(max(start, lowest), highest)
    if runs(size):
        low = size
        while True:
            if low >= highest:
                return highest
            trial = min(2 * low, highest)
            if not runs(trial):
                high = trial
                break
            low = trial
    else:
        high = size
        while True:
            if high <= lowest:
                return None
            trial = max(high // 2, lowest)
            if runs(trial):
                low = trial
                break
            high = trial
    while high - low > max(1.0, resolution * low):
        middle = (low + high) // 2
        if runs(middle):
            low = middle
        else:
            high = middle
    return low


#: Where a word's map came from when the installed accelerate cannot balance without a GPU.
CPU_STAND_IN = "cpu stand-in: infer_auto_device_map(max_memory) (this accelerate needs a GPU)"


def word_map(
    model: nn.Module, word: str, max_memory: Mapping[int | str, int]
) -> tuple[dict[str, int | str], str]:
    """The map ``from_pretrained(device_map=word, max_memory=max_memory)`` computes, and its source.

    transformers' own function where it has one (5.x: ``integrations.accelerate._get_device_map``,
    4.5x: ``modeling_utils._get_device_map``); else (4.45, where ``from_pretrained`` inlines it)
    accelerate's ``get_balanced_memory`` + ``infer_auto_device_map`` with ``_no_split_modules``.
    accelerate before 1.15 cannot balance GPU indices on a machine without a GPU
    (``torch.device(0)`` raises there): ``--tiny`` on the cpu then falls back to
    ``infer_auto_device_map`` on ``max_memory`` itself, and says so (:data:`CPU_STAND_IN`).
    """
    import torch
    import transformers.modeling_utils
    from accelerate import infer_auto_device_map

    from omnifix._plan.skeleton import no_split_modules

    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:
        _get_device_map = getattr(transformers.modeling_utils, "_get_device_map", None)
    dtype = next(model.parameters()).dtype
    no_split = sorted(no_split_modules(model))
    try:
        if _get_device_map is not None:
            arity = len(inspect.signature(_get_device_map).parameters)
            extra = (None,) if arity == 4 else (None, dtype, None)  # 5.x: 4, 4.5x: 6 parameters
            source = f"transformers {_get_device_map.__module__}._get_device_map"
            return dict(_get_device_map(model, word, dict(max_memory), *extra)), source
        from accelerate.utils import get_balanced_memory

        balanced = get_balanced_memory(
            model,
            max_memory=dict(max_memory),
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=word == "balanced_low_0",
        )
        source = "accelerate get_balanced_memory + infer_auto_device_map"
    except RuntimeError:
        if torch.cuda.is_available():
            raise
        balanced, source = dict(max_memory), CPU_STAND_IN
    found = infer_auto_device_map(
        model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype
    )
    return dict(found), source


class Runner:
    """One built model, moved between maps, probed at sizes; remembers every probe."""

    def __init__(
        self, model: nn.Module, *, args: argparse.Namespace, contexts: dict[int, int]
    ) -> None:
        self.model = model
        self.args = args
        self.contexts = contexts
        self.placed: mem.Placed | None = None
        self.cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.deadline = time.monotonic() + args.deadline

    def _caps(self, capped: bool) -> None:
        if not self.args.tiny:
            mem.set_caps(dict.fromkeys(self.contexts, CAP if capped else None), self.contexts)

    def place(self, device_map: dict[str, int | str], hooks: str) -> None:
        """Move the model to ``device_map`` (uncapped while moving), dispatched with ``hooks``."""
        placed_map = mem.on_cpu(device_map) if self.args.tiny else device_map
        current = self.placed
        if current is not None and current.device_map == placed_map and current.hooks == hooks:
            return
        self._caps(capped=False)
        self.placed = None
        self.placed = mem.place(self.model, current, placed_map, hooks=hooks)
        self._caps(capped=True)

    def probe(self, kind: Kind, device_map: dict[str, int | str], hooks: str, size: int) -> dict:
        """Run ``kind`` at ``size`` on ``device_map``; cached by (map, hook style, kind, size)."""
        style = hooks if len(set(device_map.values())) > 1 else "none"
        key = (kind, style, tuple(sorted(device_map.items(), key=str)), size)
        if key in self.cache:
            return {**self.cache[key], "reused": True}
        if time.monotonic() > self.deadline:
            raise OutOfTimeError
        self.place(device_map, hooks)
        work = kind.workload(size * (1 if self.args.tiny else kind.step), **self._work_options())
        gpus = [] if self.args.tiny else sorted(self.contexts)
        run = mem.run_generate(self.model, self.model, work, gpus=gpus)
        result = {
            "size": size * (1 if self.args.tiny else kind.step),
            "status": run.status,
            "seconds": run.seconds,
            "peaks": run.peaks,
            "allocated_before_run": run.before,
        }
        self.cache[key] = result
        return result

    def _work_options(self) -> dict[str, Any]:
        return {"new_tokens": self.args.new_tokens, "tiny": self.args.tiny}


def _search(
    runner: Runner,
    kind: Kind,
    runs: Callable[[int], bool],
    start: int,
) -> tuple[int | None, str]:
    """``largest`` over ``kind``'s bounds (in steps), stopped by the deadline."""
    tiny = runner.args.tiny
    try:
        found = largest(
            runs,
            start=start,
            lowest=1 if tiny else kind.lowest // kind.step,
            highest=kind.tiny_highest if tiny else kind.highest // kind.step,
        )
    except OutOfTimeError:
        return None, "cut short: deadline"
    return found, "ok"


def _at_capacity(record: dict[str, Any], probes: list[dict[str, Any]]) -> None:
    ran = [p for p in probes if p["status"] == "ok" and p["size"] == record["capacity"]]
    if not ran:
        return
    peaks = ran[-1]["peaks"]
    record["peaks"] = peaks
    if len(peaks) > 1 and min(peaks.values()) > 0:
        record["imbalance"] = round(max(peaks.values()) / min(peaks.values()), 3)


def search_word(
    runner: Runner, kind_name: str, word: str, device_map: dict[str, int | str], start: int
) -> dict[str, Any]:
    """The capacity of ``kind`` on one word's fixed map."""
    kind = KINDS[kind_name]
    probes: list[dict[str, Any]] = []
    best: list[int] = []

    def runs(size: int) -> bool:
        probe = runner.probe(kind, device_map, "accelerate", size)
        probes.append(probe)
        if probe["status"].startswith("error"):
            raise RuntimeError(probe["status"])
        if probe["status"] == "ok":
            best.append(probe["size"])
        return bool(probe["status"] == "ok")

    found, status = _search(runner, kind, runs, start)
    record = _record(runner, kind_name, word, found=found, status=status, best=best, probes=probes)
    record["device_map"] = device_map
    return record


def search_omnifix(runner: Runner, kind_name: str, planning: nn.Module) -> dict[str, Any]:
    """omnifix's capacity: the largest size whose plan fits and that runs."""
    import torch

    import omnifix

    kind = KINDS[kind_name]
    tiny = runner.args.tiny
    scale = 1 if tiny else kind.step
    plans: dict[int, omnifix.PlacementPlan] = {}

    def plan(size: int) -> omnifix.PlacementPlan:
        if size not in plans:
            plans[size] = omnifix.plan_placement(
                planning,
                budgets={0: CAP, 1: CAP},
                dtype=torch.float32 if tiny else torch.bfloat16,
                attn_implementation="sdpa",
                workload=kind.workload(size * scale, **runner._work_options()),  # noqa: SLF001
            )
        return plans[size]

    planned, _ = _search(runner, kind, lambda size: plan(size).fits, _start(kind, tiny))
    probes: list[dict[str, Any]] = []
    failures: list[int] = []
    best: list[int] = []

    def runs(size: int) -> bool:
        chosen = plan(size)
        if not chosen.fits:
            probes.append({"size": size * scale, "status": "predicted not to fit"})
            return False
        probe = runner.probe(kind, dict(chosen.device_map), "lean", size)
        probe = {
            **probe,
            "device_map": chosen.device_map,
            "predicted": {row.device: row.total for row in chosen.devices if row.total},
        }
        probes.append(probe)
        if probe["status"].startswith("error"):
            raise RuntimeError(probe["status"])
        if probe["status"] != "ok":
            failures.append(probe["size"])
            return False
        best.append(probe["size"])
        return True

    found, status = _search(runner, kind, runs, planned or _start(kind, tiny))
    record = _record(
        runner, kind_name, "omnifix", found=found, status=status, best=best, probes=probes
    )
    record["plan_capacity"] = None if planned is None else planned * scale
    record["prediction_failures"] = failures
    if found is not None:
        record["device_map"] = plan(found).device_map
    return record


def _start(kind: Kind, tiny: bool) -> int:
    return kind.tiny_start if tiny else kind.start // kind.step


def _record(
    runner: Runner,
    kind_name: str,
    placement: str,
    *,
    found: int | None,
    status: str,
    best: list[int],
    probes: list[dict[str, Any]],
) -> dict[str, Any]:
    kind = KINDS[kind_name]
    tiny = runner.args.tiny
    scale = 1 if tiny else kind.step
    capacity = found * scale if found is not None else (max(best) if best else None)
    highest = kind.tiny_highest if tiny else kind.highest
    record: dict[str, Any] = {
        "case": f"{kind_name}/{placement}",
        "kind": kind_name,
        "preset": kind.preset,
        "placement": placement,
        "unit": kind.unit,
        "resolution": RESOLUTION,
        "step": scale,
        "bounds": [1 if tiny else kind.lowest, highest],
        "capacity": capacity,
        "at_bound": capacity == highest,
        "status": status,
        "probes": probes,
    }
    if capacity is not None:
        work = kind.workload(capacity, **runner._work_options())  # noqa: SLF001
        record["workload"] = str(work)
    _at_capacity(record, probes)
    return record


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: each placement's capacity, and omnifix / auto."""
    summary: dict[str, Any] = {}
    for case in cases:
        if "kind" not in case:
            continue
        entry = summary.setdefault(case["kind"], {"unit": case["unit"]})
        entry[case["placement"]] = case.get("capacity")
    for entry in summary.values():
        auto, ours = entry.get("auto"), entry.get("omnifix")
        entry["omnifix_over_auto"] = round(ours / auto, 3) if auto and ours is not None else None
    return summary


def _selected(only: str) -> list[tuple[str, str]]:
    parts = [part for part in only.split(",") if part]
    return [
        (kind, placement)
        for kind in KINDS
        for placement in PLACEMENTS
        if not parts or any(part in f"{kind}/{placement}" for part in parts)
    ]


def _build(
    preset: str, args: argparse.Namespace, contexts: dict[int, int]
) -> tuple[nn.Module, dict[str, dict[str, int | str]], dict[str, str], nn.Module]:
    """The preset built once (random weights), its word maps and their source, a meta twin."""
    import psutil

    model = mem.skeleton(preset, tiny=args.tiny)
    # What accelerate's get_max_memory would read on a real 24 GiB card, context already taken.
    max_memory: dict[int | str, int] = {
        gpu: CAP - contexts.get(gpu, 0) for gpu in (contexts or {0: 0, 1: 0})
    }
    max_memory["cpu"] = psutil.virtual_memory().available
    found = {word: word_map(model, word, max_memory) for word in WORDS}
    maps = {word: device_map for word, (device_map, _) in found.items()}
    sources = {word: source for word, (_, source) in found.items()}
    first = maps["auto"]
    materialize(model, mem.on_cpu(first) if args.tiny else first)
    model.eval()
    mem.undispatch(model, None)
    mem.set_attention(model, "sdpa")
    return model, maps, sources, mem.skeleton(preset, tiny=args.tiny)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated parts of kind/placement keys")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds of probing")
    parser.add_argument("--tiny", action="store_true", help="cpu smoke run with tiny models")
    args = parser.parse_args(argv)

    import torch

    contexts: dict[int, int] = {}
    if not args.tiny:
        if torch.cuda.device_count() < 2:
            parser.error("needs two GPUs")
        contexts = mem.warm_up([0, 1])
    method = (
        f"Two GPUs capped at 24 GiB each (allocator fraction (24 GiB - context) / total; CUDA "
        f"context per GPU: {contexts} bytes); bf16, sdpa, {args.new_tokens} new tokens greedy. "
        "Word maps from transformers' own _get_device_map with max_memory = 24 GiB - context; "
        "omnifix maps from plan_placement(budgets={0: '24GiB', 1: '24GiB'}) per size. Capacity: "
        f"largest size that runs, by doubling then bisection to {RESOLUTION:.0%}. Peak per GPU = "
        "max_memory_allocated + bytes outside the allocator."
    )
    selected = _selected(args.only)
    cases: list[dict[str, Any]] = []
    started = time.monotonic()
    for preset in dict.fromkeys(KINDS[kind].preset for kind, _ in selected):
        if args.tiny and mem.tiny_family(preset) is None:
            continue
        runner: Runner | None = None
        try:
            model, maps, sources, planning = _build(preset, args, contexts)
            runner = Runner(model, args=args, contexts=contexts)
            del model  # the runner owns it: dropping the runner must free the GPUs
            runner.deadline = started + args.deadline
            for kind_name in dict.fromkeys(k for k, _ in selected if KINDS[k].preset == preset):
                _run_kind(
                    runner,
                    kind_name,
                    maps=maps,
                    sources=sources,
                    planning=planning,
                    selected=selected,
                    cases=cases,
                    args=args,
                    method=method,
                )
        except Exception as error:  # noqa: BLE001 - a failed preset is a result to record
            cases.append(
                {
                    "case": f"{preset}/build",
                    "status": error_status(error),
                }
            )
            _write(args.out, method, cases)
        finally:
            if runner is not None:
                mem.undispatch(runner.model, runner.placed)
            runner = None
            mem.free_memory()
    print(json.dumps({"summary": summarize(cases)}), flush=True)
    return 0


def _run_kind(
    runner: Runner,
    kind_name: str,
    *,
    maps: dict[str, dict[str, int | str]],
    sources: dict[str, str],
    planning: nn.Module,
    selected: list[tuple[str, str]],
    cases: list[dict[str, Any]],
    args: argparse.Namespace,
    method: str,
) -> None:
    kind = KINDS[kind_name]
    done: dict[str, dict[str, Any]] = {}
    for placement in PLACEMENTS:
        if (kind_name, placement) not in selected:
            continue
        try:
            if placement == "omnifix":
                record = search_omnifix(runner, kind_name, planning)
            else:
                same = next((w for w in done if maps[w] == maps[placement]), None)
                if same is not None:
                    record = {
                        **done[same],
                        "case": f"{kind_name}/{placement}",
                        "placement": placement,
                        "reused_from": f"{kind_name}/{same}",
                    }
                else:
                    previous = [r["capacity"] for r in done.values() if r.get("capacity")]
                    start = previous[0] // (1 if args.tiny else kind.step) if previous else None
                    record = search_word(
                        runner,
                        kind_name,
                        placement,
                        maps[placement],
                        start or _start(kind, args.tiny),
                    )
                record["map_source"] = sources[placement]
                done[placement] = record
        except Exception as error:  # noqa: BLE001 - a failed search is a result to record
            record = {
                "case": f"{kind_name}/{placement}",
                "kind": kind_name,
                "placement": placement,
                "unit": kind.unit,
                "status": error_status(error),
            }
        cases.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "probes"}), flush=True)
        _write(args.out, method, cases)


def _write(path: Path, method: str, cases: list[dict[str, Any]]) -> None:
    write_results(path, SUITE, method, cases, summary=summarize(cases))


if __name__ == "__main__":
    raise SystemExit(main())
