"""``placement_report``: where a loaded model's weights are, and what its plan predicted."""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from omnifix._device_map import place_order, spell
from omnifix._devices import input_device, parse_device
from omnifix._dispatch import hooks_in_place
from omnifix._meta import find_meta_tensors
from omnifix._modules import execution_devices
from omnifix._table import Table, plain, rich
from omnifix._units import format_bytes
from omnifix.errors import OmnifixError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from rich.console import Group
    from torch import nn

    from omnifix._types import DeviceLike

__all__ = [
    "DeviceUsage",
    "LoadRecord",
    "PlacementReport",
    "placement_report",
    "remember",
    "sub_model_attention",
]


@dataclass(frozen=True, kw_only=True)
class DeviceUsage:
    """One device of a :class:`PlacementReport`.

    Attributes:
        device: Where bytes are stored: ``"cuda:0"``, ``"cpu"``, ``"disk"``.
        weights: Bytes of parameters and buffers stored there now (measured, tied weights once),
            offloaded ones included.
        offloaded: Of ``weights``, the bytes accelerate keeps here for modules that compute on
            another device (copied there for every forward pass).
        predicted_peak: The plan's predicted peak (weights + KV cache + activations + overhead);
            ``None`` when omnifix did not plan the model or the plan does not use the device.
        budget: The plan's budget for the device; ``None`` as above, and for an unsized disk.
    """

    device: str
    weights: int
    offloaded: int = 0
    predicted_peak: int | None = None
    budget: int | None = None


@dataclass(frozen=True, kw_only=True)
class PlacementReport:
    """Where a model's weights are, and what its plan predicted (see :func:`placement_report`).

    Attributes:
        model: The model's class name.
        strategy: ``"single"``, ``"split"`` (several GPUs), ``"offload"`` (weights on cpu/disk
            behind accelerate hooks), or ``"explicit"`` (a ``device_map`` the caller gave).
        reason: Why: the plan's reason, or how the strategy was inferred.
        planned: Whether :func:`omnifix.load_safely` planned and loaded the model.
        dtype: The dtype it was loaded in; for other models the floating dtype holding the most
            bytes. Modules that pin their own dtype (Omni's float32 token2wav) show in ``dtypes``.
        dtypes: Bytes per dtype name, measured.
        attn_implementation: The config's attention implementation (``None`` without one).
        attention: Sub-models running another implementation than the model's, by module name.
        devices: One entry per device holding weights or planned to, GPUs first.
        uninitialised: Bytes of tensors on ``meta`` with no data anywhere.
        input_device: Where to put ``input_ids`` (:func:`omnifix.input_device`); ``None`` when it
            cannot be told.
        pinned_embeddings: Input embeddings :func:`omnifix.load_safely` pinned (split models).
        hooks: The device hooks on the model: ``"none"``, ``"lean"`` (:func:`omnifix.lean_dispatch`)
            or ``"accelerate"`` (accelerate's ``AlignDevicesHook`` and the like).
    """

    model: str
    strategy: str
    reason: str
    planned: bool
    dtype: torch.dtype | None
    dtypes: dict[str, int] = field(default_factory=dict)
    attn_implementation: str | None
    attention: dict[str, str] = field(default_factory=dict)
    devices: tuple[DeviceUsage, ...]
    uninitialised: int = 0
    input_device: torch.device | None
    pinned_embeddings: tuple[str, ...] = ()
    hooks: str = "none"

    @property
    def offloaded(self) -> dict[str, int]:
        """Bytes offloaded by accelerate, per place (``{"disk": ...}``); empty when none."""
        return {usage.device: usage.offloaded for usage in self.devices if usage.offloaded}

    @property
    def total_weights(self) -> int:
        """Bytes of every parameter and buffer: on devices, offloaded, and uninitialised."""
        return sum(usage.weights for usage in self.devices) + self.uninitialised

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (bytes as ints, dtypes and devices as their names).

        Example:
            >>> import omnifix, omnifix.testing
            >>> data = omnifix.placement_report(omnifix.testing.tiny_model("qwen2")).to_dict()
            >>> data["strategy"], data["input_device"], data["devices"][0]["device"]
            ('single', 'cpu', 'cpu')
        """
        data = asdict(self)
        data["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        data["input_device"] = None if self.input_device is None else str(self.input_device)
        return data

    def usage(self, device: DeviceLike) -> DeviceUsage | None:
        """The entry of ``device`` (``"cuda:0"``, ``0``, ``"cpu"``, a :class:`torch.device`).

        ``None`` for a device the model does not use; a malformed one raises
        :class:`omnifix.DeviceError`.
        """
        if not (isinstance(device, str) and device.strip().lower() == "disk"):
            parse_device(device)  # a malformed device raises, rather than matching nothing
        place = spell(device)
        return next((usage for usage in self.devices if usage.device == place), None)

    def __str__(self) -> str:
        """Strategy, dtype and attention, then bytes per device."""
        return plain(self._blocks())

    def __rich__(self) -> Group:
        """The same as :meth:`__str__`, as rich tables."""
        return rich(self._blocks())

    def _blocks(self) -> list[str | Table]:
        def size(value: int | None) -> str:
            return "-" if value is None else format_bytes(value)

        dtype = "unknown" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        attention = self.attn_implementation or "unknown"
        if self.attention:
            attention += " (" + ", ".join(f"{k}: {v}" for k, v in self.attention.items()) + ")"
        rows = []
        for usage in self.devices:
            sizes = (usage.weights, usage.offloaded or None, usage.predicted_peak, usage.budget)
            rows.append((usage.device, *(size(value) for value in sizes)))
        blocks: list[str | Table] = [
            f"{self.model}: {self.strategy} - {self.reason}",
            f"dtype {dtype}, attention {attention}, inputs on {self.input_device or 'unknown'}",
            Table(("device", "weights", "offloaded", "predicted peak", "budget"), tuple(rows)),
        ]
        if self.uninitialised:
            blocks.append(f"uninitialised (on meta, no data): {size(self.uninitialised)}")
        if self.pinned_embeddings:
            blocks.append(f"pinned embeddings: {', '.join(self.pinned_embeddings)}")
        if self.hooks == "lean":
            blocks.append("hooks: lean (omnifix's, one per device_map entry; see lean_dispatch)")
        elif self.hooks == "accelerate":
            why = " (offloaded weights are streamed by them)" if self.offloaded else ""
            blocks.append(f"hooks: accelerate{why}")
        return blocks


@dataclass(frozen=True)
class LoadRecord:
    """What :func:`omnifix.load_safely` knew when it loaded a model; the bytes come later."""

    strategy: str
    reason: str
    dtype: torch.dtype | None
    predicted: dict[str, tuple[int, int | None]]  # device -> (predicted peak, budget)
    pinned: tuple[str, ...]


# Keyed by the model itself, weakly: a record never keeps a model alive and never touches its
# state_dict (nothing is registered on the module).
_RECORDS: weakref.WeakKeyDictionary[nn.Module, LoadRecord] = weakref.WeakKeyDictionary()


def remember(model: nn.Module, record: LoadRecord) -> None:
    """Keep ``record`` for :func:`placement_report` of ``model``."""
    _RECORDS[model] = record


def sub_model_attention(model: nn.Module) -> dict[str, str]:
    """The attention implementation of the model (``""``) and of each of its sub-models."""
    transformers = sys.modules.get("transformers")  # not imported: not a transformers model
    if transformers is None:
        return {}
    found: dict[str, str] = {}
    for name, module in model.named_modules():  # the model itself first, named ""
        if name and not isinstance(module, transformers.PreTrainedModel):
            continue
        value = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(value, str) and value:
            found[name] = value
    return found


def placement_report(model: nn.Module) -> PlacementReport:
    """Where ``model``'s weights are, how it was placed, and what the plan predicted.

    Bytes are measured now; without :func:`omnifix.load_safely`'s plan, the strategy is inferred.

    Args:
        model: Any :class:`torch.nn.Module`.

    Returns:
        A :class:`omnifix.PlacementReport`; ``str(report)`` is a short table.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, omnifix
        >>> report = omnifix.placement_report(torch.nn.Linear(4, 2))
        >>> report.strategy, report.planned, report.devices[0].device, report.devices[0].weights
        ('single', False, 'cpu', 40)
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"placement_report needs a torch.nn.Module, got {type(model).__name__}; pass the "
            "model itself (e.g. the result of load_safely or from_pretrained)."
        )
    meta = find_meta_tensors(model)
    offloaded: Counter[str] = Counter()
    for entry in meta.offloaded:
        offloaded[entry.offloaded_to or "unknown"] += entry.nbytes
    weights = offloaded.copy()  # and every tensor with data where it is stored
    per_dtype: Counter[torch.dtype] = Counter()
    tensors = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    for tensor in tensors.values():  # tied weights once
        size = tensor.numel() * tensor.element_size()
        per_dtype[tensor.dtype] += size
        if not tensor.is_meta:
            weights[spell(tensor.device)] += size
    record = _RECORDS.get(model)
    if record is None:  # not loaded by load_safely: the strategy from the placement
        executing = execution_devices(model)
        if offloaded:
            strategy, reason = "offload", "inferred: some weights are offloaded behind hooks"
        elif len(executing) > 1:
            strategy, reason = "split", f"inferred: modules run on {', '.join(sorted(executing))}"
        else:
            strategy, reason = "single", "inferred: every module runs on one device"
        floating = {dtype: size for dtype, size in per_dtype.items() if dtype.is_floating_point}
        largest = max(floating, key=lambda dtype: (floating[dtype], str(dtype)), default=None)
        record = LoadRecord(strategy, reason, largest, {}, ())
    predicted = record.predicted  # device -> (predicted peak, budget)
    devices = tuple(
        DeviceUsage(
            device=name,
            weights=weights[name],
            offloaded=offloaded[name],
            predicted_peak=predicted[name][0] if name in predicted else None,
            budget=predicted[name][1] if name in predicted else None,
        )
        for name in sorted({*weights, *predicted}, key=place_order)
    )
    attention = sub_model_attention(model)
    top = attention.pop("", None)
    try:
        inputs_on: torch.device | None = input_device(model)
    except OmnifixError:
        inputs_on = None
    return PlacementReport(
        model=type(model).__name__,
        strategy=record.strategy,
        reason=record.reason,
        planned=model in _RECORDS,
        dtype=record.dtype,
        dtypes={str(dtype).removeprefix("torch."): size for dtype, size in per_dtype.items()},
        attn_implementation=top,
        attention={name: value for name, value in attention.items() if value != top},
        devices=devices,
        uninitialised=sum(tensor.nbytes for tensor in meta.uninitialised),
        input_device=inputs_on,
        pinned_embeddings=record.pinned,
        hooks=hooks_in_place(model),
    )
