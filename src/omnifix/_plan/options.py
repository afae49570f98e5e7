"""The options of a refusal: single changes that would fit, each checked by planning again.

Each option is the call that plans with exactly its change (``omnifix.plan_placement(...)``,
pasted as is) and the keywords that load with it, besides what the re-planned plan predicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._plan.budgets import SIMULATED_CAPABILITY, Budget, host_memory
from omnifix._plan.code import budgets_source, dtype_source, workload_source
from omnifix._plan.quantization import (
    Quantization,
    proposed_skips,
    quantize,
    resolve_quantization,
)
from omnifix._plan.skeleton import load_skeleton
from omnifix._plan.strategies import Request, Strategy, choose, offloaded
from omnifix._units import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

    from omnifix._plan.budgets import DeviceBudget
    from omnifix._plan.skeleton import Skeleton

__all__ = ["OptionKind", "PlanOption", "bound_option", "options", "plan_option"]

#: What an option changes.
OptionKind = Literal[
    "dtype", "attention", "workload", "gpus", "quantization", "offload", "cpu", "bound"
]
#: The most GPUs the "more GPUs" option tries.
_MAX_GPUS: Final = 8
#: Bisection steps when searching the largest workload that fits (a ~1 % resolution).
_SEARCH_STEPS: Final = 7


@dataclass(frozen=True, kw_only=True)
class PlanOption:
    """One change that makes a refused plan fit, checked by planning again with exactly it.

    Attributes:
        kind: ``"dtype"``, ``"attention"``, ``"workload"``, ``"gpus"``, ``"quantization"``,
            ``"offload"``, ``"cpu"`` or ``"bound"``.
        description: The change in words.
        arguments: The changed ``plan_placement`` keywords, as Python source.
        load: The keywords that load with the change (``load_safely`` takes them;
            ``from_pretrained`` too, but ``device=``, ``workload=``, ``allow_offload=`` and
            ``accept_bound=``), as source; ``""`` for hardware (more GPUs).
        code: The ``omnifix.plan_placement(...)`` call with the change, as source: pasted after
            ``import omnifix, torch, transformers`` it returns the plan described here.
        strategy: The re-planned strategy.
        devices: The re-planned plan's rows (need against budget per device).
    """

    kind: OptionKind
    description: str
    arguments: Mapping[str, str]
    load: str
    code: str
    strategy: Strategy
    devices: tuple[DeviceBudget, ...] = field(default=())

    @property
    def summary(self) -> str:
        """``single, peaks cuda:0 6.1 GiB of 8.0 GiB``."""
        rows = [row for row in self.devices if row.weights]
        peaks = ", ".join(
            f"{row.device} {format_bytes(row.total + row.margin)} of "
            + ("unlimited" if row.unlimited else format_bytes(row.budget))
            for row in rows
        )
        return f"{self.strategy}, peaks {peaks}"

    def __str__(self) -> str:
        """The change, what it gives, the keywords to load with, and the call that checks it."""
        lines = [f"{self.description}: fits ({self.summary})"]
        if self.load:
            lines.append(f"    load with: {self.load}")
        lines.append(f"    check: {self.code}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: kind, arguments, the code, and the re-planned plan's summary."""
        return {
            "kind": self.kind,
            "description": self.description,
            "arguments": dict(self.arguments),
            "load": self.load,
            "code": self.code,
            "plan": {
                "strategy": self.strategy,
                "fits": True,
                "devices": [
                    {
                        "device": row.device,
                        "weights": row.weights,
                        "total": row.total,
                        "margin": row.margin,
                        "budget": row.budget,
                    }
                    for row in self.devices
                ],
            },
        }


def _arguments(request: Request) -> dict[str, str]:
    """The ``plan_placement`` keywords of ``request``, as source."""
    arguments = {}
    if request.call.budgets_given:
        arguments["budgets"] = budgets_source(request.budgets)
    arguments["dtype"] = dtype_source(request.skeleton.dtype)
    arguments["attn_implementation"] = repr(request.attn)
    arguments["workload"] = workload_source(request.workload)
    if request.allow_offload:
        arguments["allow_offload"] = "True"
    if request.quantization is not None:
        arguments["quantization"] = _quantization_source(request.quantization, request.skeleton)
    return arguments


def _quantization_source(quantization: Quantization, skeleton: Skeleton) -> str:
    """``'nf4'`` where the name means exactly ``quantization``, else its ``BitsAndBytesConfig``.

    The name runs on every stack; transformers 4.x builds a 4-bit config only with bitsandbytes.
    """
    named = resolve_quantization(quantization.method, skeleton)
    return repr(quantization.method) if named == quantization else quantization.code(skeleton.dtype)


def _option(
    request: Request,
    changed: Request,
    kind: OptionKind,
    description: str,
    changes: Mapping[str, str | None],
    *,
    load: str,
) -> PlanOption | None:
    """The option of ``changed`` (``request`` with ``changes``) when its plan fits."""
    strategy, _, attempt = choose(changed)
    if strategy == "refuse":
        return None
    arguments = _arguments(request)
    for key, value in changes.items():
        arguments.pop(key, None)
        if value is not None:
            arguments[key] = value
    ordered = ("budgets", "dtype", "attn_implementation", "workload", "allow_offload")
    order = {key: index for index, key in enumerate(ordered)}
    code_arguments = dict(sorted(arguments.items(), key=lambda kv: order.get(kv[0], len(order))))
    shown = {key: value for key, value in changes.items() if value is not None}
    return PlanOption(
        kind=kind,
        description=description,
        arguments=shown,
        load=load,
        code=changed.call.source(code_arguments),
        strategy=strategy,
        devices=attempt.rows,
    )


def plan_option(
    request: Request,
    kind: OptionKind,
    description: str,
    changes: Mapping[str, str],
    *,
    strategy: Strategy,
    rows: tuple[DeviceBudget, ...],
) -> PlanOption:
    """An option already checked by its caller: ``request``'s call with ``changes`` (as source)."""
    return PlanOption(
        kind=kind,
        description=description,
        arguments=dict(changes),
        load="",
        code=request.call.source({**_arguments(request), **changes}),
        strategy=strategy,
        devices=rows,
    )


def bound_option(
    request: Request, strategy: Strategy, rows: tuple[DeviceBudget, ...]
) -> PlanOption:
    """Accepting the conservative bound a plan of a model not wholly understood rests on."""
    arguments = {**_arguments(request), "accept_bound": "True"}
    return PlanOption(
        kind="bound",
        description="accept_bound=True (the conservative bound the notes state)",
        arguments={"accept_bound": "True"},
        load="accept_bound=True",
        code=request.call.source(arguments),
        strategy=strategy,
        devices=rows,
    )


def _rebuilt(request: Request, dtype: torch.dtype) -> Request | None:
    """``request`` with its skeleton in ``dtype`` (``None`` for a model the user built)."""
    skeleton = request.skeleton
    if skeleton.config is None:
        return None
    rebuilt = load_skeleton(skeleton.config, model_class=skeleton.model_class, dtype=dtype)
    if request.quantization is not None:
        rebuilt = quantize(rebuilt, request.quantization)
    return replace(request, skeleton=rebuilt)


def _fits(request: Request, *, balanced: bool = True) -> bool:
    strategy, _, _ = choose(request, balanced=balanced)
    return strategy != "refuse"


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


def _workload(request: Request) -> list[PlanOption]:
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

        def shorter(n: int, name: str = name) -> Request:
            changes: dict[str, Any] = {name: float(n) if name.endswith("_seconds") else n}
            return replace(request, workload=replace(work, **changes))

        # Unbalanced: the verdict is the same, and the search plans many times.
        best = _largest(lowest, current, lambda n: _fits(shorter(n), balanced=False))
        if best is None:
            continue
        changed = shorter(best)
        source = workload_source(changed.workload)
        option = _option(
            request,
            changed,
            "workload",
            f"a shorter workload: {name}={best} (at most {best} {unit})",
            {"workload": source},
            load=f"workload={source}",
        )
        found += [option] if option else []
    return found


def _dtype(request: Request) -> list[PlanOption]:
    import torch

    if request.skeleton.dtype != torch.float32:
        return []  # already half
    if request.gpus:
        capabilities = [b.capability or SIMULATED_CAPABILITY for b in request.gpus]
        half = torch.bfloat16 if min(capabilities) >= (8, 0) else torch.float16
    else:  # the cpu computes in bfloat16 too, slower than in float32 on some
        half = torch.bfloat16
    changed = _rebuilt(request, half)
    if changed is None:
        return []  # a built model that cannot be rebuilt
    source = dtype_source(half)
    option = _option(
        request,
        changed,
        "dtype",
        f"dtype={source} (half the weight memory)",
        {"dtype": source},
        load=f"dtype={source}",
    )
    return [option] if option else []


def _attention(request: Request) -> list[PlanOption]:
    if request.attn != "eager":
        return []
    option = _option(
        request,
        replace(request, attn="sdpa"),
        "attention",
        "attn_implementation='sdpa' (no attention scores in memory; flash_attention_2 too)",
        {"attn_implementation": "'sdpa'"},
        load="attn_implementation='sdpa'",
    )
    return [option] if option else []


def _more_gpus(request: Request) -> list[PlanOption]:
    size = max((b.size for b in request.gpus), default=0)
    for count in range(len(request.gpus) + 1, _MAX_GPUS + 1) if request.gpus else ():
        budgets = tuple(Budget(f"cuda:{i}", size) for i in range(count))
        changed = replace(request, budgets=budgets, allow_offload=False)
        if not _fits(changed, balanced=False):
            continue
        option = _option(
            request,
            changed,
            "gpus",
            f"{count} GPUs of {format_bytes(size)}",
            {"budgets": budgets_source(budgets), "allow_offload": None},
            load="",
        )
        return [option] if option else []
    return []


def _quantised(request: Request) -> list[PlanOption]:
    import torch

    skeleton = request.skeleton
    half = skeleton.dtype in (torch.bfloat16, torch.float16)
    if not half or skeleton.config is None or request.quantization or request.allow_offload:
        return []
    skips = proposed_skips(skeleton)
    for quantization in (
        Quantization("int8", skip_modules=skips),
        Quantization("nf4", double_quant=True, skip_modules=skips),
    ):
        quantised = quantize(skeleton, quantization)
        changed = replace(request, skeleton=quantised, quantization=quantization)
        config = quantization.code(skeleton.dtype)
        weights = format_bytes(quantised.sizes[""])
        option = _option(
            request,
            changed,
            "quantization",
            f"{quantization.bits}-bit weights ({quantization.describe()}; weights {weights})",
            {"quantization": _quantization_source(quantization, skeleton)},
            load=f"quantization_config={config}",
        )
        if option is not None:
            return [option]
    return []


def _offload(request: Request) -> list[PlanOption]:
    if request.allow_offload or request.quantization is not None:
        return []
    changed = replace(request, allow_offload=True)
    strategy, _, attempt = choose(changed, balanced=False)
    if strategy != "offload":
        return []
    option = _option(
        request,
        changed,
        "offload",
        f"allow_offload=True (slow: {offloaded(attempt)})",
        {"allow_offload": "True"},
        load="allow_offload=True",
    )
    return [option] if option else []


def _cpu(request: Request) -> list[PlanOption]:
    import torch

    if not request.gpus or request.quantization is not None:
        return []
    cpu = request.budget("cpu") or Budget("cpu", host_memory(), measured=True)
    changed = (
        _rebuilt(request, torch.float32) if request.skeleton.dtype != torch.float32 else request
    )
    if changed is None:
        return []
    changed = replace(changed, budgets=(cpu,), allow_offload=False)
    source = dtype_source(torch.float32)
    option = _option(
        request,
        changed,
        "cpu",
        "the cpu alone (float32, slow)",
        {"budgets": budgets_source((cpu,)), "dtype": source, "allow_offload": None},
        load=f"device='cpu', dtype={source}",
    )
    return [option] if option else []


def options(request: Request) -> tuple[PlanOption, ...]:
    """Every single change that makes a refused plan fit, least invasive first.

    Each is checked by planning again with exactly that change: a half-precision dtype, sdpa
    instead of eager, the largest workload that fits, more GPUs, 8- or 4-bit weights, offload
    (to the cpu, or from the cpu to the disk), the cpu alone.
    """
    changes = (_dtype, _attention, _workload, _more_gpus, _quantised, _offload, _cpu)
    return tuple(option for change in changes for option in change(request))
