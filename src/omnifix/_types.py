"""Type aliases shared by the public API (torch is only imported for type checking)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

#: Anything a user may call a device: ``"auto"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"``, ``"rocm"``,
#: ``"mps"``, ``"cpu"``, a CUDA index such as ``1``, a :class:`torch.device`, or ``None``
#: (= ``"auto"``).
DeviceLike: TypeAlias = "str | int | torch.device | None"

#: What ``from_pretrained(device_map=...)`` accepts and omnifix produces: a strategy word or an
#: explicit ``{module_name: device}`` mapping.
DeviceMapValue: TypeAlias = (
    'Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str]'
)

#: What :func:`omnifix.resolve_device_map` accepts: a device, a strategy word such as
#: ``"balanced"``, or an explicit ``{module_name: device}`` plan.
DeviceRequest: TypeAlias = "DeviceLike | Mapping[str, int | str | torch.device]"

#: Where accelerate keeps an offloaded tensor.
OffloadLocation: TypeAlias = Literal["cpu", "disk"]

#: An attention implementation, or a dict of them per sub-config (nested like the configs).
AttentionRequest: TypeAlias = "str | Mapping[str, AttentionRequest]"
