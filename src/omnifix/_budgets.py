"""Device budgets for the planner: measured free memory, or explicit (possibly simulated) sizes.

A budget is the memory one device may use for this model: weights, KV cache, activations and,
for a GPU, the CUDA context. Measured budgets (``torch.cuda.mem_get_info``) come after the context
is created, so the planner does not charge it twice; explicit ones are whole cards or caps and do
include it. Explicit GPU budgets are not checked against this machine's GPUs, so a laptop can plan
for a server (simulated budgets).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from omnifix._device_map import place_order
from omnifix.errors import DeviceError, InvalidArgumentError

if TYPE_CHECKING:
    from omnifix._attention import Capability

__all__ = ["Budget", "format_bytes", "host_memory", "parse_size", "resolve_budgets"]

GIB: Final = 2**30
_CUDA_ALIASES: Final = ("cuda", "gpu", "rocm", "hip")


@dataclass(frozen=True)
class Budget:
    """The memory one device may use.

    Attributes:
        device: ``"cuda:N"``, ``"cpu"`` or ``"disk"``, as :func:`omnifix._device_map.spell`
            spells them.
        size: Bytes available.
        measured: ``True`` when ``size`` is free memory measured now (the CUDA context is
            already paid); ``False`` for an explicit size, which has to hold the context too.
        capability: The compute capability of a real GPU; ``None`` for simulated GPUs and the cpu.
    """

    device: str
    size: int
    measured: bool = False
    capability: Capability | None = None

    @property
    def is_gpu(self) -> bool:
        """Whether this is a CUDA GPU (real or simulated)."""
        return self.device.startswith("cuda:")


def format_bytes(size: float) -> str:
    """``25769803776`` -> ``"24.0 GiB"``; sizes under 0.1 GiB in MiB.

    Example:
        >>> from omnifix._budgets import format_bytes
        >>> format_bytes(24 * 2**30), format_bytes(3 * 2**20)
        ('24.0 GiB', '3.0 MiB')
    """
    if abs(size) >= GIB / 10:
        return f"{size / GIB:.1f} GiB"
    return f"{size / 2**20:.1f} MiB"


def parse_size(value: object, *, what: str) -> int:
    """Bytes from an int, a float or a size string such as ``"24GiB"`` or ``"80GB"``.

    Strings are parsed by accelerate's ``convert_file_size_to_int`` (the parser of
    ``max_memory``), so the same spellings work here and in ``from_pretrained``.

    Raises:
        InvalidArgumentError: Negative, not a number, or an unknown unit.

    Example:
        >>> from omnifix._budgets import parse_size
        >>> parse_size("24GiB", what="budget"), parse_size("1.5GB", what="budget")
        (25769803776, 1500000000)
    """
    from accelerate.utils import convert_file_size_to_int

    size: int | None = None
    if isinstance(value, str):
        try:
            size = int(convert_file_size_to_int(value.strip().replace(" ", "")))
        except ValueError:
            size = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    if size is None or size < 0:
        raise InvalidArgumentError(
            f"{what}={value!r} is not a memory size. Pass a number of bytes (>= 0) or a string "
            "with a unit, such as '24GiB' or '80GB'."
        )
    return size


def _device(key: object) -> str:
    """The device a budget key names: ``"cuda:N"``, ``"cpu"`` or ``"disk"``.

    Availability is deliberately not checked: explicit budgets may describe another machine.
    """
    from omnifix._devices import parse_device

    if isinstance(key, str) and key.strip().lower() == "disk":
        return "disk"
    kind, index = parse_device(key)  # spelling errors raise DeviceError with a suggestion
    if kind in _CUDA_ALIASES:
        return f"cuda:{index if index is not None else _current_cuda_index()}"
    if kind == "cpu" and index in (None, 0):
        return "cpu"
    raise DeviceError(
        f"Budget key {key!r} names a {kind!r} device; the planner places models on CUDA GPUs, "
        "the cpu and (with allow_offload=True) the disk. Use keys such as 0, 'cuda:1', 'cpu' or "
        "'disk'."
    )


def _current_cuda_index() -> int:
    import torch

    return int(torch.cuda.current_device()) if torch.cuda.is_available() else 0


def host_memory() -> int:
    """Bytes of host memory available now (psutil, which accelerate depends on)."""
    psutil: Any = importlib.import_module("psutil")  # untyped; a dependency of accelerate
    return int(psutil.virtual_memory().available)


def _capability(index: int) -> Capability | None:
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def _measured(*, allow_offload: bool) -> tuple[Budget, ...]:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return (Budget("cpu", host_memory(), measured=True),)
    budgets = [
        Budget(
            f"cuda:{index}",
            int(torch.cuda.mem_get_info(index)[0]),
            measured=True,
            capability=_capability(index),
        )
        for index in range(torch.cuda.device_count())
    ]
    if allow_offload:
        budgets.append(Budget("cpu", host_memory(), measured=True))
    return tuple(budgets)


def resolve_budgets(
    budgets: Mapping[Any, object] | None, *, allow_offload: bool
) -> tuple[Budget, ...]:
    """The budgets to plan with, GPUs first (by index), then ``cpu``, then ``disk``.

    Args:
        budgets: ``None`` to measure: free memory of every visible GPU
            (``torch.cuda.mem_get_info``), or the host's available memory on a machine without
            one. Otherwise ``{device: size}`` with devices as :func:`omnifix.normalize_device`
            spells them (``0``, ``"cuda:1"``, ``"gpu"``, ``"cpu"``) or ``"disk"``, and sizes as
            :func:`parse_size` reads them. GPUs this machine lacks are allowed (simulated).
        allow_offload: With measured budgets, add the host memory as a ``cpu`` budget.

    Raises:
        InvalidArgumentError: An empty mapping, a size that is not one, or a device named twice.
        DeviceError: A key that is not a device, or one the planner cannot place on (``mps``).

    Example:
        >>> from omnifix._budgets import resolve_budgets
        >>> [(b.device, b.size) for b in resolve_budgets({"cuda:1": "1GiB", 0: 2**30},
        ...                                              allow_offload=False)]
        [('cuda:0', 1073741824), ('cuda:1', 1073741824)]
    """
    if budgets is None:
        return _measured(allow_offload=allow_offload)
    if not isinstance(cast("object", budgets), Mapping) or not budgets:
        raise InvalidArgumentError(
            f"budgets={budgets!r} gives no device: pass a mapping such as "
            "{0: '24GiB', 1: '24GiB'} (or {'cpu': '64GiB'}), or None to measure this machine."
        )
    parsed: dict[str, Budget] = {}
    for key, value in budgets.items():
        device = _device(key)
        if device in parsed:
            raise InvalidArgumentError(
                f"budgets name {device!r} twice (as {key!r} too). Give each device once."
            )
        index = device.partition(":")[2]
        capability = _capability(int(index)) if index else None
        size = parse_size(value, what=f"budgets[{key!r}]")
        parsed[device] = Budget(device, size, capability=capability)
    return tuple(sorted(parsed.values(), key=lambda b: place_order(b.device)))
