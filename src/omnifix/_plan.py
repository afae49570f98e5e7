"""The placement planner: where each module goes, and whether the workload fits, before loading.

``from_pretrained(device_map="auto")`` balances *weights* over the devices it sees and offloads
whatever does not fit to cpu and disk without a word. Activations, the KV cache, the logits and the
whole vision/audio tower work are not in that sum, so the first GPU runs out of memory at inference
while the others have room, or the model silently runs from the cpu. :func:`plan_placement`
decides before anything is loaded, from a skeleton on ``meta``:

1. ``single``: the GPU with the most memory holds weights + KV cache + activation peak + CUDA
   context + a safety margin. ``device_map={"": index}``: no hooks, no hops between devices.
2. ``split``: several GPUs, filled in order by transformers' own ``infer_auto_device_map`` with
   each device's budget first reduced by what its share of the workload needs there (the tower
   GPU runs the vision/audio encoders and keeps the inputs; the last one computes the logits; each
   keeps the KV cache of its layers). Contiguous blocks, ``lm_head`` with the last layers, as few
   device boundaries as the budgets allow. Then the GPUs that fill uses (no more) are balanced:
   their ``max_memory`` is bisected until the highest predicted utilisation (peak + margin over
   budget) is as low as whole layers allow, so unequal GPUs end up equally full.
3. ``offload`` (only with ``allow_offload=True``): what the GPUs cannot hold goes to ``"cpu"``,
   then ``"disk"``, explicitly in the map.
4. ``refuse``: the plan says by how much each device is short and which changes would fit, each
   checked by planning again (dtype, attention, a shorter workload, more GPUs, quantisation,
   offload, the cpu). :func:`omnifix.load_safely` raises it as an
   :class:`omnifix.InsufficientMemoryError`.

The memory model is in ``omnifix._estimate`` (its constants, and the GPU measurements they were
fitted to, are in ``omnifix._estimate.CALIBRATION``).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from omnifix._budgets import Budget, host_memory, resolve_budgets
from omnifix._device_map import OFFLOAD_TARGETS, Placement, place_order
from omnifix._estimate import CALIBRATION, DeviceUsage, estimate
from omnifix._table import Block, Table, plain, rich
from omnifix._units import format_bytes
from omnifix._workload import Workload
from omnifix.errors import InsufficientMemoryError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import torch
    from rich.console import Group

    from omnifix._attention import Capability
    from omnifix._skeleton import Skeleton

__all__ = [
    "UNLIMITED",
    "AttnImplementation",
    "DeviceBudget",
    "PlacementPlan",
    "Strategy",
    "Workload",
    "plan_placement",
]

#: How a plan places the model.
Strategy = Literal["single", "split", "offload", "refuse"]
#: Attention implementations the planner models (flash and flex attention materialise no
#: scores, like sdpa).
AttnImplementation = Literal[
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
]

#: Budget of a ``"disk"`` nobody sized: accelerate puts no limit on it either.
UNLIMITED: Final = 2**62
#: Simulated GPUs (explicit budgets for GPUs this machine lacks) are assumed to be this recent.
_SIMULATED_CAPABILITY: Final[Capability] = (8, 0)
#: The most GPUs the "more GPUs" option tries.
_MAX_GPUS: Final = 8
#: Phases of the encoders that run before the language model.
_TOWER_PHASES: Final = frozenset({"vision", "video", "audio"})
#: Bisection steps when searching the largest workload that fits (a ~1 % resolution).
_SEARCH_STEPS: Final = 7
#: The most maps the balancing pass tries (one ``infer_auto_device_map`` call each).
_BALANCE_STEPS: Final = 8
#: The balancing pass stops once its bracket on the highest utilisation is this narrow (0.2 % of
#: a budget: a tenth of a 7B decoder layer on a 24 GiB card).
_BALANCE_TOLERANCE: Final = 0.002


# --------------------------------------------------------------------------------------------
# Public data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceBudget:
    """One device's predicted use against its budget, in bytes."""

    device: str
    budget: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    #: Kept free on top of the predicted peak (allocator fragmentation, estimate error).
    margin: int = 0
    #: The phase that sets the activation peak: ``"prefill"``, ``"logits"``, ``"logits copy"``
    #: (the input GPU of a split, where the root hook copies the logits back), ``"vision"``,
    #: ``"video"``, ``"audio"`` or ``"talker"``; ``""`` where nothing computes.
    phase: str = ""

    @property
    def total(self) -> int:
        """Predicted peak: weights + KV cache + activation peak + fixed overhead."""
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        """Whether the predicted peak plus the safety margin is within the budget."""
        return self.total + self.margin <= self.budget

    @property
    def headroom(self) -> int:
        """Budget left after the predicted peak and the margin (negative: short by that much)."""
        return self.budget - self.total - self.margin

    @property
    def unlimited(self) -> bool:
        """Whether nobody sized this device's budget (a disk that offload may fill)."""
        return self.budget >= UNLIMITED


@dataclass(frozen=True, kw_only=True)
class PlacementPlan:
    """The planner's answer (see :func:`omnifix.plan_placement`).

    Attributes:
        model: What was planned (preset name, directory name or class name).
        strategy: ``"single"``, ``"split"``, ``"offload"`` or ``"refuse"``.
        reason: Why this strategy, in one sentence with the numbers.
        device_map: For ``from_pretrained(device_map=...)``: ``"cuda:N"``, ``"cpu"``,
            ``"disk"``, spelled as :func:`omnifix.resolve_device_map` spells them. For a
            refusal, the closest attempt (do not load with it).
        devices: Predicted use of every GPU in the budgets (used or not), and of ``cpu``/``disk``
            where the map uses them.
        dtype: Dtype the numbers assume (pass it to ``from_pretrained``).
        attn_implementation: Attention the numbers assume.
        workload: The workload planned for.
        options: For a refusal: each change that fits, checked by planning again.
        input_device: Where ``input_ids`` go: the execution device of the input embeddings
            (``None`` for a refusal, or a model without them).
        notes: Assumptions behind the numbers.
    """

    model: str
    strategy: Strategy
    reason: str
    device_map: dict[str, str]
    devices: tuple[DeviceBudget, ...]
    dtype: torch.dtype
    attn_implementation: AttnImplementation
    workload: Workload
    options: tuple[str, ...] = field(default=())
    input_device: torch.device | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        """Whether every device's predicted peak is within its budget."""
        return self.strategy != "refuse" and all(device.fits for device in self.devices)

    @property
    def devices_used(self) -> tuple[str, ...]:
        """Devices that hold weights, in map order."""
        return tuple(dict.fromkeys(self.device_map.values()))

    @property
    def boundaries(self) -> int:
        """How often consecutive modules of the map change device (tensors cross devices)."""
        values = list(self.device_map.values())
        return sum(1 for before, after in itertools.pairwise(values) if before != after)

    def device(self, name: str) -> DeviceBudget:
        """The row of ``name`` (``"cuda:0"``, ``"cpu"``)."""
        for row in self.devices:
            if row.device == name:
                return row
        known = ", ".join(row.device for row in self.devices)
        raise InvalidArgumentError(f"The plan has no device {name!r}. Ask for one of {known}.")

    def explain(self) -> str:
        """Why the plan fits; or what does not fit, by how much where, and what would fit.

        For a refusal, the message of the :class:`omnifix.InsufficientMemoryError` that
        :meth:`raise_if_refused` raises; it ends with the fix.
        """
        head = (
            f"{self.model} ({_dtype_name(self.dtype)}, {self.attn_implementation}, {self.workload})"
        )
        if self.fits:
            return f"{head} fits: {self.reason}."
        lines = [f"{head} does not fit the memory it may use: {self.reason}."]
        lines += [f"  {_need_line(row)}" for row in self.devices if row.weights or not row.fits]
        return "\n".join([*lines, *self._options()])

    def raise_if_refused(self) -> PlacementPlan:
        """Return the plan if it fits, else raise :class:`omnifix.InsufficientMemoryError`.

        Raises:
            InsufficientMemoryError: With :meth:`explain` as the message and the plan as
                ``error.plan``.
        """
        if not self.fits:
            raise InsufficientMemoryError(self.explain(), plan=self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (bytes as ints, the dtype as its name)."""
        return {
            "model": self.model,
            "strategy": self.strategy,
            "fits": self.fits,
            "reason": self.reason,
            "dtype": _dtype_name(self.dtype),
            "attn_implementation": self.attn_implementation,
            "workload": asdict(self.workload),
            "device_map": dict(self.device_map),
            "input_device": None if self.input_device is None else str(self.input_device),
            "devices": [
                {**asdict(row), "total": row.total, "fits": row.fits} for row in self.devices
            ],
            "options": list(self.options),
            "notes": list(self.notes),
        }

    def _options(self) -> list[str]:
        """A refusal's options, each checked by planning again, and the fix."""
        if self.fits:
            return []
        if not self.options:
            return [
                (
                    "Fix: use GPUs with more free memory or more GPUs; nothing that omnifix can "
                    "change (dtype, attention, workload, quantisation, offload, cpu) fits here."
                )
            ]
        return [
            "Options that fit (each checked by planning again):",
            *(f"  - {option}" for option in self.options),
            (
                "Fix: apply one of these options (the first is the least invasive), or free "
                "memory on the GPUs."
            ),
        ]

    def _blocks(self) -> list[Block]:
        """What :meth:`__str__` and :meth:`__rich__` show, top to bottom."""
        cells: dict[str, Callable[[DeviceBudget], str]] = {
            "budget": lambda row: "unlimited" if row.unlimited else format_bytes(row.budget),
            "weights": lambda row: format_bytes(row.weights),
            "KV cache": lambda row: format_bytes(row.kv_cache),
            "activations": lambda row: (
                format_bytes(row.activations) + (f" ({row.phase})" if row.phase else "")
            ),
            "overhead": lambda row: format_bytes(row.overhead),
            "total": lambda row: format_bytes(row.total),
            "margin": lambda row: format_bytes(row.margin),
            "fits": lambda row: "yes" if row.fits else f"NO ({format_bytes(-row.headroom)} short)",
        }
        devices = tuple(row.device for row in self.devices)
        verdict = "fits" if self.fits else "does not fit"
        return [
            (
                f"PlacementPlan for {self.model}: {self.strategy} "
                f"({_dtype_name(self.dtype)}, {self.attn_implementation}) - {verdict}"
            ),
            f"workload: {self.workload}",
            f"why: {self.reason}",
            Table(
                ("", *devices),
                tuple((name, *map(cell, self.devices)) for name, cell in cells.items()),
                title="memory per device",
                style=_verdict_style,
                fold=frozenset(devices),
            ),
            Table(
                ("device", "modules"),
                tuple(_map_summary(self.device_map)),
                title="device_map",
                fold=frozenset({"modules"}),
            ),
            *self._options(),
        ]

    def __str__(self) -> str:
        """The strategy and why, a table of the devices, the map as layer ranges, the options."""
        return plain(self._blocks())

    def __rich__(self) -> Group:
        """The same as :meth:`__str__`, as rich tables (``rich.print(plan)``, ``omnifix plan``)."""
        return rich(self._blocks())


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _verdict_style(_device: str, text: str) -> str:
    """Green for a device that fits, red for one that does not; numbers stay plain."""
    return "green" if text == "yes" else "red" if text.startswith("NO (") else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _need_line(row: DeviceBudget) -> str:
    parts = (
        f"weights {format_bytes(row.weights)} + KV cache {format_bytes(row.kv_cache)} + "
        f"activations {format_bytes(row.activations)} + overhead {format_bytes(row.overhead)}"
    )
    verdict = "fits" if row.fits else f"{format_bytes(-row.headroom)} short"
    budget = "unlimited" if row.unlimited else format_bytes(row.budget)
    return (
        f"{row.device}: needs {format_bytes(row.total + row.margin)} ({parts}, plus a "
        f"{format_bytes(row.margin)} margin), has {budget}: {verdict}"
    )


_NUMBERED: Final = re.compile(r"^(?P<stem>.*\.)(?P<index>\d+)$")


def _map_summary(device_map: Mapping[str, str]) -> list[tuple[str, str]]:
    """Consecutive entries per device, numbered layers folded into ranges (``layers.0-13``)."""
    groups: list[tuple[str, list[str]]] = []
    for name, device in device_map.items():
        if not groups or groups[-1][0] != device:
            groups.append((device, []))
        groups[-1][1].append(name or "(whole model)")
    summary = []
    for device, names in groups:
        folded: list[str] = []
        run: tuple[str, int, int] | None = None
        for name in [*names, ""]:
            match = _NUMBERED.match(name)
            if match and run and run[0] == match["stem"] and run[2] + 1 == int(match["index"]):
                run = (run[0], run[1], int(match["index"]))
                continue
            if run:
                first, last = run[1], run[2]
                folded.append(f"{run[0]}{first}" + (f"-{last}" if last != first else ""))
                run = None
            if match:
                run = (match["stem"], int(match["index"]), int(match["index"]))
            elif name:
                folded.append(name)
        summary.append((device, ", ".join(folded)))
    return summary


# --------------------------------------------------------------------------------------------
# Evaluating a placement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """Everything one plan depends on; options re-plan with some of it changed."""

    skeleton: Skeleton
    budgets: tuple[Budget, ...]
    attn: str
    workload: Workload
    allow_offload: bool

    @property
    def gpus(self) -> tuple[Budget, ...]:
        return tuple(b for b in self.budgets if b.is_gpu)

    def budget(self, device: str) -> Budget | None:
        return next((b for b in self.budgets if b.device == device), None)


@dataclass(frozen=True)
class _Attempt:
    device_map: dict[str, str]
    rows: tuple[DeviceBudget, ...]
    usage: Mapping[str, DeviceUsage]

    def row(self, device: str) -> DeviceBudget:
        return next(row for row in self.rows if row.device == device)

    @property
    def fits(self) -> bool:
        return all(row.fits for row in self.rows)

    @property
    def spills(self) -> bool:
        """Whether accelerate had to put modules on cpu or disk."""
        return any(value in OFFLOAD_TARGETS for value in self.device_map.values())

    def excess(self) -> dict[str, int]:
        return {row.device: -row.headroom for row in self.rows if not row.fits}


def _evaluate(request: _Request, device_map: dict[str, str]) -> _Attempt:
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
    # Offloaded weights are streamed to the main device, one entry at a time.
    streamed = max((skeleton.sizes.get(name, 0) for name in placement.offloaded), default=0)
    devices = [b.device for b in request.gpus]
    devices += [d for d in OFFLOAD_TARGETS if d in weights or d in usage]
    devices += [d for d in weights if d not in devices]  # spilled to an unbudgeted device
    rows = tuple(
        _row(
            request,
            device,
            weights.get(device, 0),
            usage.get(device, DeviceUsage()),
            streamed if device == placement.main else 0,
        )
        for device in devices
    )
    return _Attempt(device_map, rows, usage)


def _row(
    request: _Request, device: str, weights: int, usage: DeviceUsage, streamed: int
) -> DeviceBudget:
    cal = CALIBRATION
    budget = request.budget(device)
    gpu = device not in OFFLOAD_TARGETS
    used = weights > 0 or bool(usage.phases) or usage.kv_cache > 0
    activations = usage.activations + streamed
    overhead = 0
    if used and gpu:
        paid = budget is not None and budget.measured
        overhead = cal.workspace + (0 if paid else cal.cuda_context)
    margin = 0
    if used and device != "disk":
        margin = int(cal.margin_bytes + cal.margin_fraction * (usage.kv_cache + activations))
        if gpu:
            # The caching allocator's fresh segments: for the largest transient blocks (see
            # CALIBRATION.fresh_blocks), or a share of eager activations when that is larger.
            eager = cal.eager_block_fraction * activations if request.attn == "eager" else 0
            margin += int(max(usage.fresh, eager))
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
        overhead=overhead,
        margin=margin if used else 0,
        phase=usage.peak_phase,
    )


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def _single(request: _Request, budget: Budget) -> _Attempt:
    return _evaluate(request, {"": budget.device})


def _reservations(request: _Request, devices: Sequence[Budget]) -> dict[str, int]:
    """First guess of what each device needs besides weights.

    No KV cache yet (it is added as the layers land); the language model's activations on every
    device that computes, and on the first one the towers and the inputs too (what it would
    need holding the whole model).
    """
    first = devices[0]
    usage = _evaluate(request, {"": first.device}).usage[first.device]
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
            request, device.device, 1, DeviceUsage(phases={"": 0}, blocks={"": fresh}), activations
        )
        reserve[device.device] = probe.overhead + probe.activations + probe.margin
    return reserve


def _fill(request: _Request, devices: Sequence[Budget]) -> _Attempt:
    """Fill ``devices`` in order with transformers' ``infer_auto_device_map``.

    Each device's ``max_memory`` starts at its budget less its reservation; while a device is
    over budget, its ``max_memory`` drops to the weights it got less its excess, so it sheds
    layers (and their KV cache) to the next device. Limits only shrink, so this ends.
    """
    from omnifix._skeleton import infer_device_map

    reserve = _reservations(request, devices)
    limits = {d.device: max(0, d.size - reserve[d.device]) for d in devices}
    attempt = None
    for _ in range(4 + 3 * len(devices)):
        attempt = _evaluate(request, infer_device_map(request.skeleton, limits))
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


def _balance(request: _Request, split: _Attempt) -> _Attempt:
    """``split`` re-filled so that the highest predicted utilisation of its GPUs is minimal.

    The in-order fill gives each GPU all it can hold before the next one gets anything. This
    pass fills the same GPUs (only those: the device count stays) again under a common cap ``t``
    on the utilisation (peak + margin over budget). Every GPU but the last gets as
    ``max_memory`` its weights in the latest fitting map plus the gap between its need there and
    ``t`` over what each byte of layers brings (the byte, its KV cache, their margin); the last
    takes the rest. ``t`` starts at the perfect balance (total need over summed budgets), rises
    by at most one layer per boundary while the map misses it, then is bisected down to a
    quarter of a layer. Each probe is one ``infer_auto_device_map`` call (contiguous blocks in
    module order) judged by :func:`_evaluate`; only a map that fits, spills nothing, uses the
    same GPUs and lowers the highest utilisation replaces ``split``.
    """
    from omnifix._skeleton import infer_device_map

    values = set(split.device_map.values())
    used = [b for b in request.gpus if b.device in values]
    if len(used) < 2:  # noqa: PLR2004 - one GPU: nothing to balance
        return split
    keys = [b.device for b in used]

    def peak(attempt: _Attempt) -> float:
        return max(_utilisation(attempt.row(key)) for key in keys)

    def need(attempt: _Attempt, key: str) -> int:
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
        attempt = _evaluate(request, infer_device_map(skeleton, limits))
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


def _balance_summary(attempt: _Attempt) -> str:
    """``balanced to within 1.7 % predicted utilisation (52.3-54.0 % of each GPU's budget)``."""
    values = set(attempt.device_map.values())
    shares = [_utilisation(row) for row in attempt.rows if row.device in values]
    lowest, highest = min(shares), max(shares)
    return (
        f"balanced to within {100 * (highest / lowest - 1):.1f} % predicted utilisation "
        f"({100 * lowest:.1f}-{100 * highest:.1f} % of each GPU's budget)"
    )


def _offload(request: _Request) -> _Attempt:
    """GPUs first, then the cpu (its budget, else the host memory free now), then the disk."""
    budgets = request.budgets
    if request.budget("cpu") is None:
        budgets = (*budgets, Budget("cpu", host_memory(), measured=True))
    with_cpu = replace(request, budgets=budgets)
    order = [b for b in budgets if b.is_gpu] + [b for b in budgets if not b.is_gpu]
    return _fill(with_cpu, order)


def _total_need(attempt: _Attempt) -> int:
    return sum(row.total + row.margin for row in attempt.rows)


def _plan(request: _Request, *, balance: bool = True) -> tuple[Strategy, str, _Attempt]:
    """The first strategy that fits, or the closest refused attempt.

    ``balance=False`` skips balancing a split (the verdict is the same; searches that only
    need the verdict save the time).
    """
    gpus = sorted(request.gpus, key=lambda b: (-b.size, place_order(b.device)))
    if not gpus:
        return _plan_cpu(request)
    # The GPU with the most memory (the first of equals): if it cannot hold everything, no
    # other one can.
    largest = _single(request, gpus[0])
    need = largest.row(gpus[0].device)
    if largest.fits:
        return "single", _single_reason(need), largest
    closest = largest
    if len(gpus) > 1:
        split = _fill(request, request.gpus)
        if split.fits and not split.spills:
            if balance:
                split = _balance(request, split)
            used = list(dict.fromkeys(split.device_map.values()))
            reason = (
                f"no single GPU holds it ({format_bytes(need.total + need.margin)} needed, "
                f"{need.device} has {format_bytes(need.budget)}); split into {len(used)} "
                f"contiguous blocks over {', '.join(used)}, each GPU's budget reduced by its own "
                "KV cache, activation peak and overhead first"
            )
            if balance:
                reason += f", then {_balance_summary(split)}"
            return "split", reason, split
        closest = split
    return _offload_or_refuse(
        request,
        closest,
        f"it needs {format_bytes(_total_need(closest))} in all and no placement on these GPUs "
        f"fits ({_shortfalls(request, closest)})",
    )


def _offload_or_refuse(
    request: _Request, closest: _Attempt, why: str
) -> tuple[Strategy, str, _Attempt]:
    """Offload when allowed and it fits, else refuse with ``why`` and the closest attempt."""
    if request.allow_offload:
        offload = _offload(request)
        if offload.fits:
            return "offload", _offload_reason(offload), offload
    return "refuse", why + ("" if request.allow_offload else "; offload is off"), closest


def _shortfalls(request: _Request, attempt: _Attempt) -> str:
    """``cuda:0 1.2 GiB short, 3.4 GiB of weights fit on no GPU``."""
    parts = []
    for row in attempt.rows:
        if row.fits:
            continue
        if request.budget(row.device) is None:  # accelerate's overflow: cpu/disk nobody offered
            if row.weights:
                parts.append(f"{format_bytes(row.weights)} of weights fit on no GPU")
            continue
        parts.append(f"{row.device} {format_bytes(-row.headroom)} short")
    return ", ".join(parts)


def _plan_cpu(request: _Request) -> tuple[Strategy, str, _Attempt]:
    cpu = request.budget("cpu")
    if cpu is None:
        raise InvalidArgumentError(
            "budgets name no GPU and no cpu, so nothing can compute. Add a GPU or a 'cpu' budget, "
            "e.g. {0: '24GiB'} or {'cpu': '64GiB'}."
        )
    attempt = _single(request, cpu)
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


def _offloaded(attempt: _Attempt) -> str:
    """``9.5 GiB on cpu, copied to cuda:0 for every forward pass``."""
    parked = {row.device: row.weights for row in attempt.rows if row.device in OFFLOAD_TARGETS}
    gpu = Placement.of(attempt.device_map).main
    where = " and ".join(
        f"{format_bytes(size)} of weights on {dev}" for dev, size in parked.items()
    )
    return f"{where}, copied to {gpu} for every forward pass"


def _offload_reason(attempt: _Attempt) -> str:
    return (
        f"the GPUs cannot hold it; allow_offload=True puts {_offloaded(attempt)} (much slower "
        "than a GPU-only placement)"
    )


# --------------------------------------------------------------------------------------------
# Options for a refusal, each checked by planning again
# --------------------------------------------------------------------------------------------


def _fits(request: _Request, *, balance: bool = True) -> tuple[bool, _Attempt]:
    strategy, _, attempt = _plan(request, balance=balance)
    return strategy != "refuse", attempt


def _peak_summary(attempt: _Attempt) -> str:
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


def _workload_options(request: _Request) -> list[str]:
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
            return _fits(replace(request, workload=changed), balance=False)[0]

        best = _largest(lowest, current, fits)
        if best is not None:
            found.append(f"a shorter workload: {name}={best} (at most {best} {unit}) fits")
    return found


def _dtype_option(request: _Request) -> list[str]:
    import torch

    from omnifix._skeleton import load_skeleton

    if request.skeleton.dtype != torch.float32 or not request.gpus:
        return []
    if request.skeleton.config is None:  # a built model without a config: cannot rebuild
        return []
    capabilities = [b.capability or _SIMULATED_CAPABILITY for b in request.gpus]
    half = torch.bfloat16 if min(capabilities) >= (8, 0) else torch.float16
    skeleton = load_skeleton(
        request.skeleton.config, model_class=request.skeleton.model_class, dtype=half
    )
    ok, attempt = _fits(replace(request, skeleton=skeleton))
    return [f"dtype={half} (half the weight memory): fits, {_peak_summary(attempt)}"] if ok else []


def _attention_option(request: _Request) -> list[str]:
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


def _more_gpus_option(request: _Request) -> list[str]:
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


def _quantisation_options(request: _Request) -> list[str]:
    import torch

    from omnifix._skeleton import quantized_skeleton

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


def _offload_option(request: _Request) -> list[str]:
    if request.allow_offload or not request.gpus:
        return []
    ok, attempt = _fits(replace(request, allow_offload=True))
    if not ok:
        return []
    return [f"allow_offload=True (slow): fits with {_offloaded(attempt)}"]


def _cpu_option(request: _Request) -> list[str]:
    import torch

    from omnifix._skeleton import load_skeleton

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
            f"device='cpu' ({_dtype_name(skeleton.dtype)}, slow): fits, needs "
            f"{format_bytes(row.total + row.margin)} of {format_bytes(row.budget)} host memory"
        )
    ]


def _options(request: _Request) -> tuple[str, ...]:
    """Every single change that makes the plan fit, least invasive first."""
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


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _planned_dtype(dtype: torch.dtype | str, budgets: Iterable[Budget]) -> torch.dtype:
    from omnifix._attention import choose_dtype

    capabilities = [b.capability or _SIMULATED_CAPABILITY for b in budgets if b.is_gpu]
    return choose_dtype(dtype, capabilities=capabilities)


def _planned_attention(
    requested: str, dtype: torch.dtype, budgets: Iterable[Budget], model_class: type
) -> AttnImplementation:
    import torch

    from omnifix._attention import IMPLEMENTATIONS, choose_attention

    capabilities = [b.capability or _SIMULATED_CAPABILITY for b in budgets if b.is_gpu]
    if requested == "auto":
        chosen = choose_attention(
            "auto", dtype=dtype, capabilities=capabilities, model_class=model_class
        )
    else:
        # Validation only: a plan may assume a backend this machine lacks (it plans for another).
        chosen = choose_attention(
            requested,
            dtype=torch.bfloat16,
            capabilities=[(9, 0)],
            installed=frozenset(IMPLEMENTATIONS),
        )
    if chosen not in get_args(AttnImplementation):
        return "sdpa"  # hub kernels and paged variants: modelled like sdpa
    attn: AttnImplementation = chosen  # type: ignore[assignment]
    return attn


def _check_workload(skeleton: Skeleton, workload: Workload) -> None:
    kinds = {tower.kind for tower in skeleton.anatomy.towers}
    wanted = {
        "vision": workload.image_tokens or workload.video_seconds,
        "audio": workload.audio_seconds,
    }
    for kind, amount in wanted.items():
        if amount and kind not in kinds:
            field_names = "image_tokens/video_seconds" if kind == "vision" else "audio_seconds"
            raise InvalidArgumentError(
                f"The workload has {kind} input but {skeleton.label} has no {kind} tower. Set "
                f"{field_names} to 0 for this model."
            )


def _notes(request: _Request) -> tuple[str, ...]:
    anatomy = request.skeleton.anatomy
    notes = [
        "logits: last token only (generate passes logits_to_keep=1)"
        if anatomy.last_token_logits
        else "logits: every prompt token (this model's forward takes no logits_to_keep)",
        (
            f"fixed per GPU: cuBLAS workspace {format_bytes(CALIBRATION.workspace)}, CUDA "
            f"context {format_bytes(CALIBRATION.cuda_context)} where the budget is not measured "
            "free memory"
        ),
    ]
    if anatomy.text is None:
        notes.append(
            "no language model recognised (no stack of layers with a vocabulary): weights, "
            "overhead and margin only; activations are not modelled"
        )
    if request.attn.startswith(("flash", "flex")):
        notes.append(f"{request.attn} is modelled like sdpa: no attention scores in memory")
    if any(d.role == "talker" for d in anatomy.decoders):
        notes.append("talker: weights always; its KV cache and prefill only with audio_output=True")
    return tuple(notes)


def plan_placement(
    model: object,
    *,
    model_class: type | None = None,
    # Keys are DeviceLike or "disk"; Any because Mapping keys are invariant and
    # {0: ..., "cpu": ...} is a dict[object, str] to a type checker.
    budgets: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str = "auto",
    workload: Workload | None = None,
    allow_offload: bool = False,
) -> PlacementPlan:
    """Plan where ``model`` goes for ``workload`` on ``budgets``, before loading anything.

    Pure: builds a skeleton on ``meta`` (no weights read, no GPU needed), sizes it with the
    installed transformers' own tools, predicts each device's peak (weights, KV cache,
    activations of the prefill, the towers and the logits, CUDA context) and picks the first
    strategy that fits: one GPU, a split over several GPUs, offload (only with
    ``allow_offload=True``), else a refusal that lists what would fit.

    Args:
        model: A built-in preset name (``"qwen2.5-omni-7b"``; the hub id works too), a local
            checkpoint directory (its ``config.json``), a transformers config, or a model built
            on ``meta`` (its own dtype is used when it matches).
        model_class: The class to build from a config or directory; default: the config's
            ``architectures``.
        budgets: ``{device: size}`` such as ``{0: "24GiB", 1: "24GiB"}`` or
            ``{"cuda:0": 24 * 2**30, "cpu": "64GiB"}``; GPUs this machine lacks are fine
            (simulated). ``None``: the free memory of each visible GPU now, or the host memory
            on a machine without GPUs. ``cpu`` holds the model only when it is the sole budget or
            with ``allow_offload=True``.
        dtype: ``"auto"``: bfloat16 on GPUs of compute capability 8.0+ (simulated GPUs count as
            such), float16 on older ones, float32 on the cpu. Or a dtype or its name.
        attn_implementation: ``"auto"`` (flash_attention_2 when it can run here, else sdpa),
            ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...
        workload: What the model will do; default :class:`Workload` ().
        allow_offload: Let weights that fit no GPU go to cpu, then disk.

    Returns:
        The plan; ``plan.fits`` says whether to load with ``plan.device_map``.

    Raises:
        UnsupportedModelError: ``model`` is not something the planner can build.
        InvalidArgumentError: A bad budget, dtype, attention name or workload (media the model
            has no tower for).
        DeviceError: A budget key that is not a device.

    Example:
        >>> import omnifix
        >>> work = omnifix.Workload(text_tokens=2048, image_tokens=1280)
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "24GiB"}, workload=work)
        >>> plan.strategy, plan.device_map, plan.fits, plan.input_device
        ('single', {'': 'cuda:0'}, True, device(type='cuda', index=0))
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "12GiB", 1: "12GiB"})
        >>> plan.strategy, plan.devices_used, plan.boundaries
        ('split', ('cuda:0', 'cuda:1'), 1)
        >>> plan = omnifix.plan_placement("qwen2-vl-7b", budgets={0: "8GiB"})
        >>> plan.fits, plan.options[0].split(":")[0]
        (False, '3 GPUs of 8.0 GiB')
    """
    import torch

    from omnifix._skeleton import load_skeleton

    workload = Workload() if workload is None else workload
    if not isinstance(workload, Workload):
        raise InvalidArgumentError(
            f"workload={workload!r} is not a Workload. Pass omnifix.Workload(text_tokens=..., ...)."
        )
    resolved = resolve_budgets(budgets, allow_offload=allow_offload)
    planned_dtype = _planned_dtype(dtype, resolved)
    skeleton = load_skeleton(model, model_class=model_class, dtype=planned_dtype)
    attn = _planned_attention(attn_implementation, skeleton.dtype, resolved, skeleton.model_class)
    _check_workload(skeleton, workload)
    request = _Request(skeleton, resolved, attn, workload, allow_offload)
    strategy, reason, attempt = _plan(request)
    input_name = skeleton.anatomy.input_embeddings
    input_device = None
    if input_name is not None and strategy != "refuse":
        runs_on = Placement.of(attempt.device_map).runs_on(input_name)
        input_device = None if runs_on is None else torch.device(runs_on)
    return PlacementPlan(
        model=skeleton.label,
        strategy=strategy,
        reason=reason,
        device_map=attempt.device_map,
        devices=attempt.rows,
        dtype=skeleton.dtype,
        attn_implementation=attn,
        workload=workload,
        options=_options(request) if strategy == "refuse" else (),
        input_device=input_device,
        notes=_notes(request),
    )
