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


def _replan(request: Request, *, balanced: bool = True) -> Attempt | None:
    """The plan of ``request`` when it fits, else ``None``."""
    strategy, _, attempt = choose(request, balanced=balanced)
    return None if strategy == "refuse" else attempt


def _peaks(attempt: Attempt) -> str:
    rows = [row for row in attempt.rows if row.weights]
    return "peaks " + ", ".join(
        f"{row.device} {format_bytes(row.total)} of {format_bytes(row.budget)}" for row in rows
    )


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


def _workload(request: Request) -> list[str]:
    """The largest of each workload dimension that fits, the others unchanged."""
    work, found = request.workload, []
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
            # Unbalanced: the verdict is the same, and the search plans many times.
            return _replan(replace(request, workload=changed), balanced=False) is not None

        best = _largest(lowest, current, fits)
        if best is not None:
            found.append(f"a shorter workload: {name}={best} (at most {best} {unit}) fits")
    return found


def _dtype(request: Request) -> list[str]:
    import torch

    skeleton = request.skeleton
    if skeleton.dtype != torch.float32 or not request.gpus or skeleton.config is None:
        return []  # already half, the cpu, or a built model that cannot be rebuilt
    capabilities = [b.capability or SIMULATED_CAPABILITY for b in request.gpus]
    half = torch.bfloat16 if min(capabilities) >= (8, 0) else torch.float16
    halved = load_skeleton(skeleton.config, model_class=skeleton.model_class, dtype=half)
    attempt = _replan(replace(request, skeleton=halved))
    return (
        []
        if attempt is None
        else [f"dtype={half} (half the weight memory): fits, {_peaks(attempt)}"]
    )


def _attention(request: Request) -> list[str]:
    attempt = _replan(replace(request, attn="sdpa")) if request.attn == "eager" else None
    if attempt is None:
        return []
    sdpa = "attn_implementation='sdpa' or 'flash_attention_2' (no attention scores in memory)"
    return [f"{sdpa}: fits, {_peaks(attempt)}"]


def _more_gpus(request: Request) -> list[str]:
    size = max((b.size for b in request.gpus), default=0)
    for count in range(len(request.gpus) + 1, _MAX_GPUS + 1) if request.gpus else ():
        budgets = tuple(Budget(f"cuda:{i}", size) for i in range(count))
        attempt = _replan(replace(request, budgets=budgets, allow_offload=False))
        if attempt is not None:
            return [f"{count} GPUs of {format_bytes(size)}: fits, {_peaks(attempt)}"]
    return []


def _quantised(request: Request) -> list[str]:
    import torch

    skeleton = request.skeleton
    if skeleton.dtype not in (torch.bfloat16, torch.float16) or skeleton.config is None:
        return []
    for bits in (8, 4):
        quantised = quantized_skeleton(skeleton, bits)
        attempt = _replan(replace(request, skeleton=quantised))
        if attempt is not None:
            weights = format_bytes(quantised.sizes[""])
            config = f"quantisation_config=BitsAndBytesConfig(load_in_{bits}bit=True)"
            return [f"{config} (estimated: weights {weights}): fits, {_peaks(attempt)}"]
    return []


def _offload(request: Request) -> list[str]:
    offload = not request.allow_offload and request.gpus
    attempt = _replan(replace(request, allow_offload=True)) if offload else None
    return [] if attempt is None else [f"allow_offload=True (slow): fits with {offloaded(attempt)}"]


def _cpu(request: Request) -> list[str]:
    import torch

    if not request.gpus:
        return []
    cpu = request.budget("cpu") or Budget("cpu", host_memory(), measured=True)
    skeleton = request.skeleton
    if skeleton.dtype != torch.float32 and skeleton.config is not None:
        skeleton = load_skeleton(
            skeleton.config, model_class=skeleton.model_class, dtype=torch.float32
        )
    attempt = _replan(replace(request, skeleton=skeleton, budgets=(cpu,), allow_offload=False))
    if attempt is None:
        return []
    row, dtype = attempt.rows[0], str(skeleton.dtype).removeprefix("torch.")
    need = f"{format_bytes(row.total + row.margin)} of {format_bytes(row.budget)} host memory"
    return [f"device='cpu' ({dtype}, slow): fits, needs {need}"]


def options(request: Request) -> tuple[str, ...]:
    """Every single change that makes a refused plan fit, least invasive first.

    Each is checked by planning again with that change: a half-precision dtype, sdpa instead of
    eager, the largest workload that fits, more GPUs, 8- or 4-bit weights, offload, the cpu.
    """
    changes = (_dtype, _attention, _workload, _more_gpus, _quantised, _offload, _cpu)
    return tuple(option for change in changes for option in change(request))
