"""The strategies: evaluate a map, and choose one GPU, a split or an offload, else refuse.

How each strategy builds its map is explained in docs/planning.md ("How the planner decides").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, Literal

from omnifix._device_map import OFFLOAD_TARGETS, Placement, place_order
from omnifix._plan.budgets import (
    UNLIMITED,
    Allocator,
    Budget,
    DeviceBudget,
    allocator_settings,
    host_memory,
)
from omnifix._plan.code import Call
from omnifix._plan.estimate import CALIBRATION, PhasePeaks, estimate
from omnifix._plan.skeleton import infer_device_map
from omnifix._units import format_bytes
from omnifix.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from omnifix._plan.quantization import Quantization
    from omnifix._plan.skeleton import Skeleton
    from omnifix._plan.workload import Workload

__all__ = ["Attempt", "Request", "Strategy", "balance", "choose", "evaluate", "fill"]
__all__ += ["offload", "offloaded", "single"]

#: How a plan places the model (``"parallel"``: tensor/pipeline parallel, see ``plan.parallel``).
Strategy = Literal["single", "split", "offload", "parallel", "refuse"]
#: Phases of the encoders that run before the language model.
_TOWER_PHASES: Final = frozenset({"vision", "video", "audio"})
#: The most maps the balancing pass tries (one ``infer_auto_device_map`` call each).
_BALANCE_STEPS: Final = 8
#: The balancing pass stops once its bracket on the highest utilisation is this narrow (0.2 % of
#: a budget: a tenth of a 7B decoder layer on a 24 GiB card).
_BALANCE_TOLERANCE: Final = 0.002


@dataclass(frozen=True)
class Request:
    """Everything one plan depends on; options re-plan with some of it changed."""

    skeleton: Skeleton
    budgets: tuple[Budget, ...]
    attn: str
    workload: Workload
    allow_offload: bool
    #: The CUDA allocator configuration the GPUs' reserved peaks are predicted for.
    allocator: Allocator = field(default_factory=allocator_settings)
    #: The bitsandbytes quantisation the skeleton's weights are sized for, if any.
    quantization: Quantization | None = None
    #: How the user called the planner, to write each option as a call.
    call: Call = field(default_factory=Call)
    #: What the checkpoint stores that the memory model does not size (quantised weights), and
    #: what its safetensors headers say (the plan's notes).
    unsized: tuple[str, ...] = ()
    stored: tuple[str, ...] = ()

    @property
    def gpus(self) -> tuple[Budget, ...]:
        """The GPU budgets, by index."""
        return tuple(b for b in self.budgets if b.is_gpu)

    def budget(self, device: str) -> Budget | None:
        """The budget of ``device``, if it has one."""
        return next((b for b in self.budgets if b.device == device), None)


@dataclass(frozen=True)
class Attempt:
    """A map and what it predicts: a row per device, and the phase peaks behind the rows."""

    device_map: dict[str, str]
    rows: tuple[DeviceBudget, ...]
    usage: Mapping[str, PhasePeaks]

    def row(self, device: str) -> DeviceBudget:
        """The row of ``device``."""
        return next(row for row in self.rows if row.device == device)

    @property
    def fits(self) -> bool:
        """Whether every device's peak and margin are within its budget."""
        return all(row.fits for row in self.rows)

    @property
    def spills(self) -> bool:
        """Whether accelerate had to put modules on cpu or disk."""
        return any(value in OFFLOAD_TARGETS for value in self.device_map.values())

    def excess(self) -> dict[str, int]:
        """By how much each device that does not fit is short."""
        return {row.device: -row.headroom for row in self.rows if not row.fits}


def evaluate(request: Request, device_map: dict[str, str]) -> Attempt:
    """Weights, KV cache, activations, overhead and margin of every device under this map."""
    skeleton = request.skeleton
    weights: dict[str, int] = {}
    for name, value in device_map.items():
        weights[value] = weights.get(value, 0) + skeleton.sizes.get(name, 0)
    placement = Placement.of(device_map)
    usage = estimate(
        skeleton.anatomy,
        execution_device=lambda name: placement.runs_on(name) or placement.main,
        load=request.workload,
        dtype=skeleton.dtype,
        attn_implementation=request.attn,
    )
    # Offloaded weights are streamed to the main device one hooked module at a time.
    extra = {placement.main: skeleton.largest_streamed(placement.offloaded)}
    # bitsandbytes dequantises a weight for a forward over several rows (the prefill).
    for name, size in skeleton.dequantized:
        device = placement.runs_on(name) or placement.main
        if device not in extra or extra[device] < size:
            extra[device] = max(extra.get(device, 0), size)
    devices = [b.device for b in request.gpus]
    devices += [d for d in OFFLOAD_TARGETS if d in weights or d in usage]
    devices += [d for d in weights if d not in devices]  # spilled to an unbudgeted device
    rows = tuple(
        _row(request, d, weights.get(d, 0), usage.get(d, PhasePeaks()), extra.get(d, 0))
        for d in devices
    )
    return Attempt(device_map, rows, usage)


def _row(
    request: Request, device: str, weights: int, usage: PhasePeaks, streamed: int
) -> DeviceBudget:
    cal = CALIBRATION
    budget = request.budget(device)
    gpu = device not in OFFLOAD_TARGETS
    used = weights > 0 or bool(usage.phases) or usage.kv_cache > 0
    activations = usage.activations + streamed
    overhead = 0
    if used and gpu:
        paid = budget is not None and budget.measured
        # Measured free memory has paid the context CUDA starts with, not the kernels to come.
        outside = cal.cuda_context - (cal.cuda_context_at_init if paid else 0)
        overhead = cal.workspace + outside
    margin = reserved = 0
    if used and device != "disk":
        margin = int(cal.margin_bytes + cal.margin_fraction * (usage.kv_cache + activations))
    if used and gpu:
        # What the caching allocator reserves beyond the allocated peak: a share of it, and
        # with the default allocator at least the fresh segments of the largest transient
        # blocks (CALIBRATION.fresh_blocks), or a share of eager activations when larger.
        allocated = weights + usage.kv_cache + activations
        if request.allocator.expandable_segments:
            reserved = int(cal.reserved_gap_expandable * allocated)
            # The prediction is the point estimate; the margin holds the rest of the worst gap.
            spread = cal.reserved_gap_expandable_worst - cal.reserved_gap_expandable
            margin += int(spread * allocated)
        else:
            eager = cal.eager_block_fraction * activations if request.attn == "eager" else 0
            reserved = int(max(cal.reserved_gap * allocated, usage.fresh, eager))
    if budget is not None:
        size = budget.size
    else:  # accelerate's unbounded disk, where offload is allowed; nothing anywhere else
        size = UNLIMITED if device == "disk" and request.allow_offload else 0
    return DeviceBudget(
        device=device,
        budget=size,
        weights=weights,
        kv_cache=usage.kv_cache,
        activations=activations,
        allocator=reserved,
        overhead=overhead,
        margin=margin if used else 0,
        phase=usage.peak_phase,
    )


def single(request: Request, budget: Budget) -> Attempt:
    """The whole model on one device."""
    return evaluate(request, {"": budget.device})


def _reservations(request: Request, devices: Sequence[Budget]) -> dict[str, int]:
    """First guess of what each device needs besides weights (the KV cache comes with layers).

    The language model's activations where layers compute; on the first device the towers and
    the inputs too (what it would need holding the whole model).
    """
    first = devices[0]
    usage = evaluate(request, {"": first.device}).usage[first.device]
    prefill = usage.phases.get("prefill", usage.kv_cache) - usage.kv_cache
    towers = max((v for k, v in usage.phases.items() if k in _TOWER_PHASES), default=0)
    gpus = any(d.is_gpu for d in devices)
    reserve = {}
    for device in devices:
        if device is first:
            activations = max(prefill, towers) + usage.inputs
            fresh = max(usage.blocks.values(), default=0)
        else:  # with GPUs, the cpu and disk only hold weights
            activations = prefill if device.is_gpu or not gpus else 0
            fresh = usage.blocks.get("prefill", 0) if device.is_gpu else 0
        probe = _row(
            request, device.device, 1, PhasePeaks(phases={"": 0}, blocks={"": fresh}), activations
        )
        reserve[device.device] = probe.overhead + probe.activations + probe.allocator + probe.margin
    return reserve


def fill(request: Request, devices: Sequence[Budget]) -> Attempt:
    """Fill ``devices`` in order with transformers' ``infer_auto_device_map``.

    Each device's ``max_memory`` is its budget less its reservation, then, while it is over
    budget, the weights it got less its excess: limits only shrink, so this ends.
    """
    reserve = _reservations(request, devices)
    limits = {d.device: max(0, d.size - reserve[d.device]) for d in devices}
    attempt = None
    for _ in range(4 + 3 * len(devices)):
        attempt = evaluate(request, infer_device_map(request.skeleton, limits))
        excess = attempt.excess()
        if not excess or any(device not in limits for device in excess):
            break  # fits, or spilled where no budget can be adjusted
        for device, short in excess.items():
            limits[device] = max(0, min(limits[device], attempt.row(device).weights) - short)
    assert attempt is not None  # noqa: S101 - the loop runs at least once
    return attempt


def _utilisation(row: DeviceBudget) -> float:
    """Predicted peak plus margin over the budget (what :attr:`DeviceBudget.fits` compares)."""
    return (row.total + row.margin) / row.budget if row.budget else math.inf


def balance(request: Request, split: Attempt) -> Attempt:
    """``split`` re-filled on the same GPUs so that their highest predicted utilisation is least.

    A bisection over a common cap on utilisation (peak + margin over budget), one
    ``infer_auto_device_map`` call per probe; only a map that fits, spills nothing, uses the same
    GPUs and lowers the highest utilisation replaces ``split`` (docs/planning.md).
    """
    values = set(split.device_map.values())
    used = [b for b in request.gpus if b.device in values]
    if len(used) < 2:  # noqa: PLR2004 - one GPU: nothing to balance
        return split
    keys = [b.device for b in used]

    def peak(attempt: Attempt) -> float:
        return max(_utilisation(attempt.row(key)) for key in keys)

    def need(attempt: Attempt, key: str) -> int:
        row = attempt.row(key)
        return row.total + row.margin

    skeleton = request.skeleton
    layers = [skeleton.sizes.get(n, 0) for d in skeleton.anatomy.decoders for n in d.layers]
    # Need per byte of weights moved across a boundary: decoder layers bring their KV cache.
    kv = (1 + CALIBRATION.margin_fraction) * sum(split.row(key).kv_cache for key in keys)
    per_byte = 1 + kv / sum(layers) if sum(layers) else 1.0
    best = latest = split
    low = sum(need(split, key) for key in keys) / sum(b.size for b in used)
    high = peak(split)
    # One layer of slack per boundary, in utilisation of the smallest GPU.
    step = (len(keys) - 1) * max(layers, default=0) * per_byte / min(b.size for b in used)
    step = step or (high - low) / 2
    tolerance = max(_BALANCE_TOLERANCE, step / (4 * (len(keys) - 1)))
    cap = low
    for _ in range(_BALANCE_STEPS):
        if high - low <= tolerance:
            break
        limits = {
            b.device: max(
                0,
                int(
                    latest.row(b.device).weights
                    + (cap * b.size - need(latest, b.device)) / per_byte
                ),
            )
            for b in used[:-1]
        }
        limits[used[-1].device] = used[-1].size  # the last GPU takes the rest
        attempt = evaluate(request, infer_device_map(skeleton, limits))
        ok = attempt.fits and not attempt.spills and set(attempt.device_map.values()) == values
        if ok:
            latest = attempt
            if peak(attempt) < peak(best):
                best = attempt
        if ok and peak(attempt) <= cap:
            high = peak(attempt)
        else:
            low = cap
        cap = min((low + high) / 2, low + step)
    return best


def _balance_summary(attempt: Attempt) -> str:
    """``balanced to within 1.7 % predicted utilisation (52.3-54.0 % of each GPU's budget)``."""
    values = set(attempt.device_map.values())
    shares = [_utilisation(row) for row in attempt.rows if row.device in values]
    lowest, highest = min(shares), max(shares)
    return (
        f"balanced to within {100 * (highest / lowest - 1):.1f} % predicted utilisation "
        f"({100 * lowest:.1f}-{100 * highest:.1f} % of each GPU's budget)"
    )


def offload(request: Request) -> Attempt:
    """GPUs first, then the cpu (its budget, else the host memory free now), then the disk."""
    budgets = request.budgets
    if request.budget("cpu") is None:
        budgets = (*budgets, Budget("cpu", host_memory(), measured=True))
    with_cpu = replace(request, budgets=budgets)
    order = [b for b in budgets if b.is_gpu] + [b for b in budgets if not b.is_gpu]
    return fill(with_cpu, order)


def choose(request: Request, *, balanced: bool = True) -> tuple[Strategy, str, Attempt]:
    """The first strategy that fits (with its reason), or the closest refused attempt.

    ``balanced=False`` skips balancing a split (the verdict is the same; searches that only
    need the verdict save the time).
    """
    gpus = sorted(request.gpus, key=lambda b: (-b.size, place_order(b.device)))
    if not gpus:
        return _plan_cpu(request)
    # The GPU with the most memory (the first of equals): if it cannot hold everything, no
    # other one can.
    largest = single(request, gpus[0])
    need = largest.row(gpus[0].device)
    if largest.fits:
        return "single", _single_reason(need), largest
    closest = largest
    if len(gpus) > 1:
        split = fill(request, request.gpus)
        if split.fits and not split.spills:
            if balanced:
                split = balance(request, split)
            used = list(dict.fromkeys(split.device_map.values()))
            reason = (
                f"no single GPU holds it ({format_bytes(need.total + need.margin)} needed, "
                f"{need.device} has {format_bytes(need.budget)}); split into {len(used)} "
                f"contiguous blocks over {', '.join(used)}, each GPU's budget reduced by its own "
                "KV cache, activation peak and overhead first"
            )
            if balanced:
                reason += f", then {_balance_summary(split)}"
            return "split", reason, split
        closest = split
    total = format_bytes(sum(row.total + row.margin for row in closest.rows))
    why = f"it needs {total} in all and no placement on these GPUs fits"
    return _offload_or_refuse(request, closest, f"{why} ({_shortfalls(request, closest)})")


def _offload_or_refuse(
    request: Request, closest: Attempt, why: str
) -> tuple[Strategy, str, Attempt]:
    """Offload when allowed and it fits, else refuse with ``why`` and the closest attempt."""
    if request.allow_offload:
        offloading = offload(request)
        # With GPUs, a map that computes on none of them is no offload (it runs on the cpu).
        computes = Placement.of(offloading.device_map).main != "cpu" or not request.gpus
        if offloading.fits and computes:
            where = offloaded(offloading)
            reason = f"the GPUs cannot hold it; allow_offload=True puts {where} (much slower than "
            return "offload", reason + "a GPU-only placement)", offloading
    return "refuse", why + ("" if request.allow_offload else "; offload is off"), closest


def _shortfalls(request: Request, attempt: Attempt) -> str:
    """``cuda:0 1.2 GiB short, 3.4 GiB of weights fit on no GPU``."""
    parts = []
    for row in (row for row in attempt.rows if not row.fits):
        if request.budget(row.device) is not None:
            parts.append(f"{row.device} {format_bytes(-row.headroom)} short")
        elif row.weights:  # accelerate's overflow: a cpu or disk nobody offered
            parts.append(f"{format_bytes(row.weights)} of weights fit on no GPU")
    return ", ".join(parts)


def _plan_cpu(request: Request) -> tuple[Strategy, str, Attempt]:
    cpu = request.budget("cpu")
    if cpu is None:
        raise InvalidArgumentError(
            "budgets name no GPU and no cpu, so nothing can compute. Add a GPU or a 'cpu' budget, "
            "e.g. {0: '24GiB'} or {'cpu': '64GiB'}."
        )
    attempt = single(request, cpu)
    row = attempt.row("cpu")
    if attempt.fits:
        return "single", _single_reason(row), attempt
    return _offload_or_refuse(
        request,
        attempt,
        f"it needs {format_bytes(row.total + row.margin)} of host memory and has "
        f"{format_bytes(row.budget)}",
    )


def _single_reason(row: DeviceBudget) -> str:
    return (
        f"everything fits on {row.device} ({format_bytes(row.total)} predicted peak + "
        f"{format_bytes(row.margin)} margin of {format_bytes(row.budget)}): one device, no hooks "
        "and no copies between devices"
    )


def offloaded(attempt: Attempt) -> str:
    """``9.5 GiB of weights on cpu, copied to cuda:0 one module at a time for every forward``.

    Only what accelerate streams: with the cpu as the main device, the cpu's own weights stay.
    """
    placement = Placement.of(attempt.device_map)
    places = set(placement.offloaded.values())
    where = " and ".join(
        f"{format_bytes(row.weights)} of weights on {row.device}"
        for row in attempt.rows
        if row.device in places and row.weights
    )
    return f"{where}, copied to {placement.main} one module at a time for every forward pass"
