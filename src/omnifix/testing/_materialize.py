"""Random weights for a meta skeleton, placed by a device map as from_pretrained places them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn


def _device_of(device_map: Mapping[str, int | str], name: str) -> int | str:
    keys = [key for key in device_map if key in {"", name} or name.startswith(key + ".")]
    if not keys:
        from omnifix.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"device_map places no module that holds {name!r}. "
            "Pass a device_map that covers every parameter, such as PlacementPlan.device_map."
        )
    return device_map[max(keys, key=len)]


def materialize(
    model: nn.Module, device_map: Mapping[str, int | str], *, std: float = 0.02, seed: int = 0
) -> nn.Module:
    """Give a ``meta`` skeleton random weights on the devices of ``device_map``, then dispatch it.

    Every parameter and buffer still on ``meta`` is created on its device (the longest
    ``device_map`` prefix that holds it) and drawn from N(0, ``std``); real tensors (buffers the
    model computed while it was built, such as rotary tables) move to their device unchanged.
    Tied weights stay tied. Then, when the map uses several devices, accelerate's
    ``dispatch_model`` adds the same hooks ``from_pretrained`` adds. The result allocates what a
    real checkpoint loaded with that map would, which is what memory measurements need.

    Args:
        model: A model whose parameters are on ``meta`` (e.g. from ``init_empty_weights()``).
        device_map: ``{module_name: device}`` covering every parameter; ``"cpu"`` is allowed,
            ``"disk"`` is not (there is no checkpoint to offload from).
        std: Standard deviation of the random weights.
        seed: Seed of the random weights.

    Returns:
        ``model`` itself, materialised and dispatched.

    Raises:
        InvalidArgumentError: ``device_map`` misses a parameter or names ``"disk"``.

    Example:
        >>> import torch, omnifix.testing as ot
        >>> from accelerate import init_empty_weights
        >>> config = ot.tiny_config("qwen2")
        >>> with init_empty_weights():
        ...     skeleton = ot.model_class("qwen2")(config)
        >>> model = ot.materialize(skeleton, {"": "cpu"})
        >>> {p.device.type for p in model.parameters()}
        {'cpu'}
    """
    import torch
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    from omnifix.errors import InvalidArgumentError

    if "disk" in device_map.values():
        raise InvalidArgumentError(
            "materialize() cannot place modules on 'disk': there is no checkpoint to offload. "
            "Map them to 'cpu' or a GPU instead."
        )
    # One generator per device: drawing 8B values on the CPU and copying them over takes minutes.
    generators: dict[torch.device, torch.Generator] = {}
    done: dict[int, torch.Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, tensor in named:
        device = torch.device(_device_of(device_map, name))
        if id(tensor) in done:  # a tied weight: point this name at the tensor already made
            set_module_tensor_to_device(model, name, device, value=done[id(tensor)])
            continue
        if tensor.device.type == "meta":
            value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            if value.is_floating_point():
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(seed)
                value.normal_(0.0, std, generator=generators[device])
            else:
                value.zero_()
        else:
            value = tensor.detach().to(device)
        set_module_tensor_to_device(model, name, device, value=value)
        done[id(tensor)] = value
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    if len(set(device_map.values())) > 1:
        dispatch_model(model, device_map=dict(device_map))
    return model
