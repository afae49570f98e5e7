"""Device budgets: the memory each device may use, and what a plan predicts it uses.

Measured free memory already paid for the CUDA context; an explicit size (a card, a cap) must
hold it too. Explicit GPUs are not checked against this machine: a laptop plans for a server.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from omnifix._attention import gpu_capabilities
from omnifix._device_map import place_order
from omnifix._devices import cuda_device_count, parse_device
from omnifix._plan.estimate import CALIBRATION
from omnifix._units import parse_size
from omnifix.errors import DeviceError, InvalidArgumentError

if TYPE_CHECKING:
    from omnifix._attention import Capability

__all__ = ["SIMULATED_CAPABILITY", "UNLIMITED", "Allocator", "Budget", "DeviceBudget"]
__all__ += ["allocator_settings", "enable_expandable_segments", "host_memory", "outside_allocator"]
__all__ += ["resolve_budgets"]

#: Budget of a ``"disk"`` nobody sized: accelerate puts no limit on it either.
UNLIMITED: Final = 2**62
#: Simulated GPUs (explicit budgets for GPUs this machine lacks) are assumed to be this recent.
SIMULATED_CAPABILITY: Final[Capability] = (8, 0)
_CUDA_ALIASES: Final = ("cuda", "gpu", "rocm", "hip")
#: The allocator settings torch reads at CUDA initialisation, first found first (torch 2.9+
#: reads ``PYTORCH_ALLOC_CONF`` and falls back to the older name).
_ALLOC_CONF: Final = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@dataclass(frozen=True)
class Allocator:
    """The CUDA caching allocator configuration the plan assumes.

    Attributes:
        backend: ``"native"`` (the caching allocator) or ``"cudaMallocAsync"``.
        expandable_segments: Whether segments grow in place (``expandable_segments:True``),
            which leaves far less reserved but unusable memory at a peak.
        source: ``"torch"`` (CUDA is initialised: the backend as torch reports it),
            ``"environment"`` (the settings torch will read when CUDA starts) or ``"default"``.
    """

    backend: str = "native"
    expandable_segments: bool = False
    source: Literal["torch", "environment", "default"] = "default"


def _parse_alloc_conf(text: str) -> dict[str, str]:
    """``key:value`` pairs separated by commas, as torch's allocator config reads them."""
    pairs = (item.partition(":") for item in text.split(",") if item.strip())
    return {key.strip(): value.strip() for key, _, value in pairs}


def allocator_settings() -> Allocator:
    """The allocator configuration in effect, or that torch will apply when CUDA starts.

    torch exposes the backend once CUDA is initialised (``get_allocator_backend()``) but no
    getter for ``expandable_segments``; both are read from the environment variables torch
    parses (``PYTORCH_ALLOC_CONF``, else ``PYTORCH_CUDA_ALLOC_CONF``), split as torch splits
    them. A CPU-only build has no allocator to ask: the environment decides.
    """
    import torch

    name = next((n for n in _ALLOC_CONF if os.environ.get(n)), None)
    settings = _parse_alloc_conf(os.environ[name]) if name else {}
    backend = settings.get("backend", "native")
    source: Literal["torch", "environment", "default"] = "environment" if name else "default"
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        backend, source = str(torch.cuda.memory.get_allocator_backend()), "torch"
    expandable = settings.get("expandable_segments", "").lower() == "true"
    return Allocator(backend, expandable, source)


@dataclass(frozen=True)
class Budget:
    """The memory one device may use.

    Attributes:
        device: ``"cuda:N"``, ``"cpu"`` or ``"disk"``.
        size: Bytes available.
        measured: ``True`` for free memory measured now (the CUDA context is already paid);
            ``False`` for an explicit size, which has to hold the context too.
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


@dataclass(frozen=True, kw_only=True)
class DeviceBudget:
    """One device's predicted use against its budget, in bytes."""

    device: str
    budget: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    #: What the caching allocator reserves beyond the allocated peak (cached but unusable
    #: blocks, fresh segments), under the allocator configuration the plan assumes.
    allocator: int = 0
    #: Kept free on top of the predicted peak (the memory model's error).
    margin: int = 0
    #: The phase that sets the activation peak: ``"prefill"``, ``"logits"``, ``"logits copy"``
    #: (the input GPU of a split, where the root hook copies the logits back), ``"decode"`` (the
    #: last decode step, with the whole KV cache), ``"vision"``, ``"video"``, ``"audio"``,
    #: ``"encoder"`` or ``"talker"``; ``""`` where nothing computes.
    phase: str = ""

    @property
    def total(self) -> int:
        """Predicted reserved peak: weights + KV cache + activations + allocator + overhead."""
        return self.weights + self.kv_cache + self.activations + self.allocator + self.overhead

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
        """Whether nobody sized this budget (a disk that offload may fill)."""
        return self.budget >= UNLIMITED


def outside_allocator(row: DeviceBudget) -> int:
    """What ``row`` counts outside the caching allocator (context and lazily loaded kernels).

    Less the context CUDA starts with, which a budget of measured free memory has already paid.
    """
    return max(0, row.overhead - CALIBRATION.workspace)


def enable_expandable_segments() -> bool:
    """Turn the CUDA caching allocator's expandable segments on, where that is still possible.

    Only before CUDA is initialised (torch reads its allocator settings once, then), only on a
    machine with CUDA, and only when the caller set no allocator settings of their own
    (``PYTORCH_ALLOC_CONF``/``PYTORCH_CUDA_ALLOC_CONF``): then ``PYTORCH_CUDA_ALLOC_CONF`` is
    set to ``expandable_segments:True`` for this process.

    Returns:
        Whether expandable segments are now what CUDA will start with.
    """
    import torch

    if any(os.environ.get(name) for name in _ALLOC_CONF):
        return allocator_settings().expandable_segments
    if not torch.cuda.is_available() or torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def _device(key: object) -> str:
    """``"cuda:N"``, ``"cpu"`` or ``"disk"`` for a budget key (not checked against this machine)."""
    if isinstance(key, str) and key.strip().lower() == "disk":
        return "disk"
    kind, index = parse_device(key)  # spelling errors raise DeviceError with a suggestion
    if kind in _CUDA_ALIASES:
        if index is None:  # "cuda": the current device where there is one
            import torch

            index = int(torch.cuda.current_device()) if torch.cuda.is_available() else 0
        return f"cuda:{index}"
    if kind == "cpu" and index in (None, 0):
        return "cpu"
    raise DeviceError(
        f"Budget key {key!r} names a {kind!r} device; the planner places models on CUDA GPUs, "
        "the cpu and (with allow_offload=True) the disk. Use keys such as 0, 'cuda:1', 'cpu' or "
        "'disk'."
    )


def host_memory() -> int:
    """Bytes of host memory available now (psutil, which accelerate depends on)."""
    psutil: Any = importlib.import_module("psutil")  # untyped; a dependency of accelerate
    return int(psutil.virtual_memory().available)


def _capability(index: int) -> Capability | None:
    import torch

    found = gpu_capabilities([torch.device("cuda", index)]) if index < cuda_device_count() else ()
    return found[0] if found else None


def _measured(*, allow_offload: bool) -> tuple[Budget, ...]:
    import torch

    count = cuda_device_count()
    if not count:
        return (Budget("cpu", host_memory(), measured=True),)
    free = [int(torch.cuda.mem_get_info(i)[0]) for i in range(count)]
    budgets = [
        Budget(f"cuda:{i}", free[i], measured=True, capability=_capability(i)) for i in range(count)
    ]
    if allow_offload:
        budgets.append(Budget("cpu", host_memory(), measured=True))
    return tuple(budgets)


def resolve_budgets(
    budgets: Mapping[Any, object] | None, *, allow_offload: bool
) -> tuple[Budget, ...]:
    """The budgets to plan with, GPUs first (by index), then ``cpu``, then ``disk``.

    Args:
        budgets: ``{device: size}`` (devices as :func:`omnifix.normalize_device` takes them, or
            ``"disk"``; sizes as :func:`omnifix._units.parse_size` reads them), or ``None``: the
            free memory of every visible GPU, or the host's on a machine without one.
        allow_offload: With measured budgets, add the host memory as a ``cpu`` budget.

    Raises:
        InvalidArgumentError: An empty mapping, a size that is not one, or a device named twice.
        DeviceError: A key that is not a device, or one the planner cannot place on (``mps``).

    Example:
        >>> from omnifix._plan.budgets import resolve_budgets
        >>> budgets = resolve_budgets({"cuda:1": "1GiB", 0: 2**30}, allow_offload=False)
        >>> [(b.device, b.size) for b in budgets]
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
