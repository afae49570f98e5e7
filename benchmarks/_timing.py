"""Helpers shared by the time suites (``overhead.py``, ``timing.py``): clocks, stats, placement.

Nothing here is part of omnifix; the suites may use its private helpers.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from _models import gpu_index

from omnifix._device_map import spell

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    import torch
    from torch import nn

__all__ = [
    "GIB",
    "Timed",
    "cuda_devices",
    "device_of",
    "devices_of",
    "place",
    "print_case",
    "spread",
    "synchronize",
    "timed",
    "tiny_threads",
]

GIB = 2**30
_T = TypeVar("_T")


@contextmanager
def tiny_threads(enabled: bool) -> Iterator[None]:
    """One cpu thread while ``enabled`` (``--tiny`` runs), the previous count restored after.

    Width-32 matmuls gain nothing from more threads, and on a loaded machine torch's thread pool
    makes each of them take milliseconds.
    """
    import torch

    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cuda_devices() -> list[int]:
    """Indices of the visible CUDA GPUs (empty on a machine without any)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def synchronize() -> None:
    """Wait for every visible GPU (nothing to wait for on the cpu)."""
    import torch

    for index in cuda_devices():
        torch.cuda.synchronize(index)


class Timed:
    """The result and the wall seconds of one call (GPUs synchronized before and after)."""

    __slots__ = ("seconds", "value")

    def __init__(self, value: Any, seconds: float) -> None:
        self.value = value
        self.seconds = seconds


def timed(call: Callable[[], _T]) -> Timed:
    """Run ``call`` once between two ``synchronize()`` and ``perf_counter()`` readings."""
    synchronize()
    start = time.perf_counter()
    value = call()
    synchronize()
    return Timed(value, time.perf_counter() - start)


def spread(values: Sequence[float], *, digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value, rounded to ``digits`` (empty values: all ``None``)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
        "values": [round(value, digits) for value in values],
    }


def print_case(case: dict[str, Any]) -> None:
    """One JSON line per case, flushed, so a log shows progress as it happens."""
    print(json.dumps(case, default=str), flush=True)


def place(model: nn.Module, device_map: Mapping[str, Any]) -> None:
    """Move every entry of ``device_map`` to its device, outer entries first (longest prefix wins).

    Entries name modules, or single parameters/buffers (``infer_auto_device_map`` lists a tensor
    that sits directly on a module it had to split). Tied tensors follow the last entry moved.
    """
    from torch import nn

    for name in sorted(device_map, key=lambda entry: (entry.count(".") if entry else -1, entry)):
        device = device_map[name]
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:  # a tensor entry
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = getattr(owner, attribute)
            if isinstance(tensor, nn.Parameter):
                moved = nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)
                owner._parameters[attribute] = moved  # noqa: SLF001 - as nn.Module._apply does
            else:
                owner._buffers[attribute] = tensor.to(device)  # noqa: SLF001
            continue
        # The class's .to: dispatch_model wraps the instance's with a warning.
        type(module).to(module, device)


def devices_of(device_map: Iterable[object]) -> list[str]:
    """The distinct devices of a map's values, in first-seen order, as strings."""
    seen: list[str] = []
    for value in device_map:
        text = spell(value, index_type="cuda")
        if text not in seen:
            seen.append(text)
    return seen


def device_of(value: int | str, devices: Sequence[torch.device]) -> torch.device:
    """A map value (GPU index or name) as a device, GPU ``i`` meaning ``devices[i]``."""
    import torch

    index = gpu_index(value)
    return torch.device(str(value)) if index is None else devices[index]
