"""Type aliases shared by the public API (torch is only imported for type checking)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias, Union

if TYPE_CHECKING:
    import torch

#: Anything a user may call a device: ``"auto"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"``, ``"rocm"``,
#: ``"mps"``, ``"cpu"``, a CUDA index such as ``1``, a :class:`torch.device`, or ``None`` (= ``"auto"``).
DeviceLike: TypeAlias = Union[str, int, "torch.device", None]

#: What ``from_pretrained(device_map=...)`` accepts and omnifix produces: a strategy word or an
#: explicit ``{module_name: device}`` mapping.
DeviceMapValue: TypeAlias = Union[
    Literal["auto", "balanced", "balanced_low_0", "sequential"],
    dict[str, Union[int, str]],
]

#: Where accelerate keeps an offloaded tensor.
OffloadLocation: TypeAlias = Literal["cpu", "disk"]
