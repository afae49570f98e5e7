"""``device_map`` values: one spelling, one lookup, and accelerate's offload rule.

Which entry places a module, which device is the main one, and what is offloaded are decided
here the way accelerate's ``dispatch_model`` (what ``from_pretrained(device_map=...)`` calls)
decides them.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from omnifix.errors import DeviceError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn

__all__ = [
    "OFFLOAD_TARGETS",
    "STRATEGIES",
    "Placement",
    "accelerator",
    "check_map",
    "current_accelerator",
    "locate",
    "npu_installed",
    "place_order",
    "spell",
]

#: The words ``from_pretrained(device_map=...)`` takes for "place the whole model for me".
STRATEGIES: Final = ("auto", "balanced", "balanced_low_0", "sequential")
#: Places that hold weights for a module that computes elsewhere (accelerate streams them in).
OFFLOAD_TARGETS: Final = ("cpu", "disk")
#: Types accelerate compares bare (``main_device == "mps"``): written without an index.
_BARE: Final = ("cpu", "mps", "disk", "meta")

_SHOWN: Final = 4  # names an error lists
_V = TypeVar("_V")


def npu_installed() -> bool:
    """Whether torch_npu can be imported (``None`` in ``sys.modules`` blocks it, as Python does)."""
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"] is not None
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):  # a broken or spec-less half-import: not usable
        return False


def current_accelerator() -> tuple[str, int] | None:
    """Torch's accelerator of this process and its current index; ``None`` without one.

    :mod:`torch.accelerator` answers, for in-tree and out-of-tree backends alike (torch_npu is
    imported first when installed: importing it is what registers npu).
    """
    import torch

    if npu_installed():
        import torch_npu  # noqa: F401
    try:
        if not torch.accelerator.is_available():
            return None
        current = torch.accelerator.current_accelerator()
        index_of = getattr(torch.accelerator, "current_device_index", None)
        index = (index_of or torch.accelerator.current_device_idx)()  # the torch 2.6 name
    # A backend registered without its torch module makes torch.accelerator raise: unusable.
    except RuntimeError:
        return None
    return (current.type, 0 if current.type == "mps" else int(index)) if current else None


def accelerator() -> str:
    """What a bare index means on this machine: the type of :func:`current_accelerator`.

    accelerate reads an integer ``device_map`` value as an index of the machine's accelerator;
    ``"cuda"`` on a machine without one, where indices describe another (simulated) machine's GPUs.
    """
    return (current_accelerator() or ("cuda", 0))[0]


def spell(value: object, *, index_type: str | None = None) -> str:
    """The one spelling of a device_map value: ``"cuda:0"``, ``"cpu"``, ``"mps"``, ``"disk"``.

    Indices (``0``, ``"0"``) become ``"<index_type>:<index>"`` (default: :func:`accelerator`);
    cpu, mps, disk and meta lose their index. Nothing is checked against this machine.

    Example:
        >>> import torch
        >>> from omnifix._device_map import spell
        >>> spell(1, index_type="cuda"), spell(torch.device("mps", 0)), spell(" CPU ")
        ('cuda:1', 'mps', 'cpu')
    """
    text = str(value).strip().lower()
    if text.isdigit():
        return f"{index_type or accelerator()}:{int(text)}"
    kind = text.partition(":")[0]
    return kind if kind in _BARE else text


def place_order(place: str) -> tuple[int, str, int]:
    """Sort key of places: accelerators by type and index, then the cpu, then the disk.

    Example:
        >>> from omnifix._device_map import place_order
        >>> sorted(["disk", "cpu", "cuda:10", "cuda:2"], key=place_order)
        ['cuda:2', 'cuda:10', 'cpu', 'disk']
    """
    kind, _, index = place.partition(":")
    return ({"cpu": 1, "disk": 2}.get(kind, 0), kind, int(index) if index.isdigit() else -1)


def locate(device_map: Mapping[str, _V], name: str) -> tuple[str, _V] | None:
    """The entry that places module (or tensor) ``name``: the longest prefix of it in the map.

    ``""`` is a prefix of every name. ``None`` when no entry covers ``name``.

    Example:
        >>> from omnifix._device_map import locate
        >>> locate({"model": 0, "model.layers.1": 1, "lm_head": 1}, "model.layers.1.mlp")
        ('model.layers.1', 1)
    """
    probe = name
    while True:
        if probe in device_map:
            return probe, device_map[probe]
        if not probe:
            return None
        probe = probe.rpartition(".")[0]


@dataclass(frozen=True)
class Placement:
    """A device_map as accelerate's ``dispatch_model`` reads it.

    The *main* device is the first value that is not ``"cpu"``/``"disk"`` (``"cpu"`` when there
    is none). Modules mapped to ``"cpu"`` or ``"disk"`` compute on the main device, and their
    weights are *offloaded* (kept there, copied in for every forward), except that a main device
    of ``"cpu"`` or ``"mps"`` offloads only ``"disk"`` entries: the ``"cpu"`` entries of such a
    map are moved to the main device when the model is dispatched.

    Attributes:
        entries: The map, values spelled by :func:`spell`.
        main: The main device.
        offloaded: The entries whose weights accelerate offloads, with their place.

    Example:
        >>> from omnifix._device_map import Placement
        >>> gpu = Placement.of({"model": "cuda:0", "lm_head": "cpu"})
        >>> gpu.main, gpu.offloaded, gpu.runs_on("lm_head")
        ('cuda:0', {'lm_head': 'cpu'}, 'cuda:0')
        >>> Placement.of({"a": "mps", "b": "cpu"}).offloaded
        {}
    """

    entries: Mapping[str, str]
    main: str
    offloaded: Mapping[str, str]

    @classmethod
    def of(cls, device_map: Mapping[str, object], *, index_type: str | None = None) -> Placement:
        """Read ``device_map`` (values as :func:`spell` takes them)."""
        entries = {
            str(name): spell(value, index_type=index_type) for name, value in device_map.items()
        }
        real = [value for value in entries.values() if value not in OFFLOAD_TARGETS]
        main = real[0] if real else "cpu"
        offloading = ("disk",) if main in ("cpu", "mps") else OFFLOAD_TARGETS
        offloaded = {name: value for name, value in entries.items() if value in offloading}
        return cls(entries, main, offloaded)

    def runs_on(self, name: str) -> str | None:
        """Where ``name`` computes: its place, or the main device for ``"cpu"``/``"disk"``."""
        found = locate(self.entries, name)
        place = None if found is None else found[1]
        return self.main if place in OFFLOAD_TARGETS else place

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices modules compute on, accelerators by index first."""
        found = {
            self.main if value in OFFLOAD_TARGETS else value for value in self.entries.values()
        }
        return tuple(sorted(found, key=place_order))

    @property
    def offloads(self) -> bool:
        """Whether accelerate streams any weights in (see :attr:`offloaded`)."""
        return bool(self.offloaded)


def check_map(model: nn.Module, device_map: Mapping[str, str]) -> None:
    """Refuse a map (spelled by :func:`spell`) that does not fit ``model``, before it is used.

    Every key must name a module, parameter or buffer of ``model``; every parameter and buffer
    must be placed by some entry (:func:`locate`, accelerate's rule); tied weights (accelerate's
    ``find_tied_parameters``) must share one place.

    Raises:
        InvalidArgumentError: A key ``model`` lacks, or tensors no entry places.
        DeviceError: Tied weights mapped to two places.
    """
    from accelerate.utils import find_tied_parameters

    modules = [name for name, _ in model.named_modules(remove_duplicate=False)]
    tensors = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    tensors += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    known = {*modules, *tensors}
    kind = type(model).__name__
    for key in device_map:
        if key not in known:
            close = difflib.get_close_matches(key, modules, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise InvalidArgumentError(
                f"The device_map names {key!r}, which {kind} has no module, parameter or buffer "
                f"called. {hint}Fix: use names from model.named_modules() (e.g. "
                f"{(modules[1:] or [''])[0]!r}), as from_pretrained does."
            )
    unplaced = list(dict.fromkeys(_unplaced(device_map, name) for name in tensors))
    unplaced = [name for name in unplaced if name is not None]
    if unplaced:
        shown = ", ".join(repr(name) for name in unplaced[:_SHOWN])
        more = f" and {len(unplaced) - _SHOWN} more" if len(unplaced) > _SHOWN else ""
        raise InvalidArgumentError(
            f"The device_map places no device for {shown}{more} of {kind}, so from_pretrained "
            "would leave those weights unplaced. Fix: add entries for them (names from "
            "model.named_modules()), or map a parent such as '' to one device."
        )
    for group in find_tied_parameters(model):
        places = {name: found[1] for name in group if (found := locate(device_map, name))}
        if len(set(places.values())) > 1:
            (first, one), *rest = places.items()
            second, other = next(item for item in rest if item[1] != one)
            raise DeviceError(
                f"The device_map puts {first} on {one!r} and {second} on {other!r}, but they "
                "share one tensor (tied weights, e.g. lm_head and embed_tokens) that can live "
                "in one place only. Fix: map both to the same device."
            )


def _unplaced(device_map: Mapping[str, object], name: str) -> str | None:
    """The outermost module around tensor ``name`` that no entry covers; ``None`` if placed."""
    if locate(device_map, name) is not None:
        return None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if not any(key == prefix or key.startswith(prefix + ".") for key in device_map):
            return prefix
    return name  # pragma: no cover - a key equal to the name would have placed it
