"""The options of a refusal: single changes that would fit, each checked by planning again."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from omnifix._plan.budgets import SIMULATED_CAPABILITY, Budget, host_memory
from omnifix._plan.skeleton import load_skeleton, quantized_skeleton
from omnifix._plan.strategies import Attempt, Request, choose, offloaded
from omnifix._units import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["options"]

#: The most GPUs the "more GPUs" option tries.
_MAX_GPUS: Final = 8
#: Bisection steps when searching the largest workload that fits (a ~1 % resolution).
_SEARCH_STEPS: Final = 7


def _fits(request: Request, *, balanced: bool = True) -> tuple[bool, Attempt]:
    strategy, _, attempt = choose(request, balanced=balanced)
    return strategy != "refuse", attempt


def _peak_summary(attempt: Attempt) -> str:
    rows = [row for row in attempt.rows if row.weights]
    peaks = ", ".join(
        f"{row.device} {format_bytes(row.total)} of {format_bytes(row.budget)}" for row in rows
    )
    return f"peaks {peaks}"


def _largest(lowest: int, current: int, fits: Callable[[int], bool]) -> int | None:
    """The largest ``n`` in ``[lowest, current)`` with ``fits(n)`` (monotone), or ``None``.

    Halves from ``current`` until one fits, then bisects the last halving to ~1 %.
    """
    bad, good = current, current // 2
    while good > lowest and not fits(good):
        bad, good = good, good // 2
    if good <= lowest:
        if not fits(lowest):
            return None
        good = lowest
    for _ in range(_SEARCH_STEPS):
        if bad - good <= max(1, good // 100):
            break
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def _workload_options(request: Request) -> list[str]:
    """The largest of each workload dimension that fits, the others unchanged."""
    work = request.workload
    found = []
    searches = (
        ("text_tokens", work.text_tokens, 0, "text tokens"),
        ("batch_size", work.batch_size, 1, "samples per batch"),
        ("image_tokens", work.image_tokens, 0, "image tokens"),
        ("video_seconds", math.ceil(work.video_seconds), 0, "seconds of video"),
        ("audio_seconds", math.ceil(work.audio_seconds), 0, "seconds of audio"),
    )
    for name, current, lowest, unit in searches:
        if current <= lowest:
            continue

        def fits(n: int, name: str = name) -> bool:
            changes: dict[str, Any] = {name: float(n) if name.endswith("_seconds") else n}
            changed = replace(work, **changes)
            return _fits(replace(request, workload=changed), balanced=False)[0]

        best = _largest(lowest, current, fits)
        if best is not None:
            found.append(f"a shorter workload: {name}={best} (at most {best} {unit}) fits")
    return found


def _dtype_option(request: Request) -> list[str]:
    import torch

    if request.skeleton.dtype != torch.float32 or not request.gpus:
        return []
    if request.skeleton.config is None:  # a built model without a config: cannot rebuild
        return []
    capabilities = [b.capability or SIMULATED_CAPABILITY for b in request.gpus]
    half = torch.bfloat16 if min(capabilities) >= (8, 0) else torch.float16
    skeleton = load_skeleton(
        request.skeleton.config, model_class=request.skeleton.model_class, dtype=half
    )
    ok, attempt = _fits(replace(request, skeleton=skeleton))
    return [f"dtype={half} (half the weight memory): fits, {_peak_summary(attempt)}"] if ok else []


def _attention_option(request: Request) -> list[str]:
    if request.attn != "eager":
        return []
    ok, attempt = _fits(replace(request, attn="sdpa"))
    if not ok:
        return []
    return [
        (
            "attn_implementation='sdpa' or 'flash_attention_2' (no attention scores in memory): "
            f"fits, {_peak_summary(attempt)}"
        )
    ]


def _more_gpus_option(request: Request) -> list[str]:
    gpus = request.gpus
    if not gpus:
        return []
    size = max(b.size for b in gpus)
    for count in range(len(gpus) + 1, _MAX_GPUS + 1):
        budgets = tuple(Budget(f"cuda:{i}", size) for i in range(count))
        ok, attempt = _fits(replace(request, budgets=budgets, allow_offload=False))
        if ok:
            return [f"{count} GPUs of {format_bytes(size)}: fits, {_peak_summary(attempt)}"]
    return []


def _quantisation_options(request: Request) -> list[str]:
    import torch

    if (
        request.skeleton.dtype not in (torch.bfloat16, torch.float16)
        or request.skeleton.config is None
    ):
        return []
    for bits in (8, 4):
        quantised = quantized_skeleton(request.skeleton, bits)
        ok, attempt = _fits(replace(request, skeleton=quantised))
        if ok:
            flag = f"load_in_{bits}bit=True"
            return [
                (
                    f"quantisation_config=BitsAndBytesConfig({flag}) (estimated: weights "
                    f"{format_bytes(quantised.sizes[''])}): fits, {_peak_summary(attempt)}"
                )
            ]
    return []


def _offload_option(request: Request) -> list[str]:
    if request.allow_offload or not request.gpus:
        return []
    ok, attempt = _fits(replace(request, allow_offload=True))
    if not ok:
        return []
    return [f"allow_offload=True (slow): fits with {offloaded(attempt)}"]


def _cpu_option(request: Request) -> list[str]:
    import torch

    if not request.gpus:
        return []
    cpu = request.budget("cpu") or Budget("cpu", host_memory(), measured=True)
    skeleton = request.skeleton
    if skeleton.dtype != torch.float32 and skeleton.config is not None:
        skeleton = load_skeleton(
            skeleton.config, model_class=skeleton.model_class, dtype=torch.float32
        )
    ok, attempt = _fits(replace(request, skeleton=skeleton, budgets=(cpu,), allow_offload=False))
    if not ok:
        return []
    row = attempt.rows[0]
    return [
        (
            f"device='cpu' ({str(skeleton.dtype).removeprefix('torch.')}, slow): fits, needs "
            f"{format_bytes(row.total + row.margin)} of {format_bytes(row.budget)} host memory"
        )
    ]


def options(request: Request) -> tuple[str, ...]:
    """Every single change that makes a refused plan fit, least invasive first.

    Each is checked by planning again with that change: a half-precision dtype, sdpa instead of
    eager, the largest workload that fits, more GPUs, 8- or 4-bit weights, offload, the cpu.
    """
    found: list[str] = []
    for option in (
        _dtype_option,
        _attention_option,
        _workload_options,
        _more_gpus_option,
        _quantisation_options,
        _offload_option,
        _cpu_option,
    ):
        found += option(request)
    return tuple(found)
