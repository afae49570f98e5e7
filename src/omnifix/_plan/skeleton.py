"""The model on ``meta``, built as ``from_pretrained`` builds it, and transformers' placement.

What the user names (a preset, a checkpoint, a config, a built model) becomes a
:class:`Skeleton`; its sizes and maps come from the sizing and ``infer_auto_device_map`` that the
installed transformers uses for ``device_map="auto"`` (its own in 5.x, accelerate's in 4.x).
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from omnifix._compat import dtype_keyword, no_init_weights, placement_module, quiet
from omnifix._config import is_hub_id, model_class_for, read_config
from omnifix._device_map import locate, spell
from omnifix._plan.anatomy import Anatomy, describe
from omnifix._plan.presets import find_preset, preset_config, preset_model_class
from omnifix.errors import InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "Skeleton",
    "build_on_meta",
    "build_skeleton",
    "infer_device_map",
    "load_skeleton",
    "module_sizes",
    "no_split_modules",
]

_CACHE_SIZE: Final = 4
_CACHE: OrderedDict[tuple[str, str, str], Skeleton] = OrderedDict()
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Skeleton:
    """A model on ``meta`` and what the planner reads from it once."""

    label: str
    model: nn.Module
    model_class: type
    dtype: torch.dtype
    no_split: frozenset[str]
    anatomy: Anatomy
    #: Bytes of every module, parameter and buffer, by qualified name ("" is the whole model).
    sizes: Mapping[str, int]
    #: Position of every module, parameter and buffer in ``named_modules`` order.
    order: Mapping[str, int]
    #: Bytes of the parameters each module holds itself, largest first: what accelerate's hooks
    #: copy to the execution device at once when the module's weights are offloaded.
    streamed: tuple[tuple[str, int], ...]
    #: How to build it again in another dtype (``None`` for a model the user built).
    config: PretrainedConfig | None
    #: Quantised weights (name, bytes in the compute dtype), largest first: bitsandbytes
    #: dequantises a weight for a forward over several rows (empty when nothing is quantised).
    dequantized: tuple[tuple[str, int], ...] = ()

    def largest_streamed(self, offloaded: Mapping[str, str]) -> int:
        """Bytes of the largest module of the ``offloaded`` entries that is copied in at once."""
        found = (size for name, size in self.streamed if locate(offloaded, name) is not None)
        return next(found, 0)


def module_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of every module, parameter and buffer, as the installed transformers counts them."""
    placement = placement_module()
    if placement is not None:
        sizes, _ = placement.compute_module_sizes(model, None, only_modules=False)
        return {name: int(size) for name, size in sizes.items()}
    from accelerate.utils import compute_module_sizes

    return {name: int(size) for name, size in compute_module_sizes(model).items()}


def no_split_modules(model: nn.Module) -> frozenset[str]:
    """The block classes that must stay on one device, as ``from_pretrained`` collects them."""
    getter = getattr(model, "_get_no_split_modules", None)  # 4.x: collected on demand
    if callable(getter):
        return frozenset(getter("auto"))
    return frozenset(getattr(model, "_no_split_modules", None) or ())  # 5.x: at post_init


def infer_device_map(skeleton: Skeleton, max_memory: Mapping[str, int]) -> dict[str, str]:
    """The installed transformers' ``device_map="sequential"`` for ``max_memory``, in module order.

    Devices (``"cuda:N"``, ``"cpu"``, ``"disk"``) are filled in order, with the fewest boundaries;
    the map's values are spelled by :func:`omnifix._device_map.spell`.
    """
    from accelerate.utils.modeling import get_max_layer_size

    placement = placement_module()
    no_split = sorted(skeleton.no_split)
    kwargs: dict[str, Any] = {"no_split_module_classes": no_split}
    if placement is not None:
        infer: Any = placement.infer_auto_device_map
        kwargs["no_placement_params"] = getattr(skeleton.model, "_no_placement_params", None)
    else:
        from accelerate import infer_auto_device_map

        infer = infer_auto_device_map
    budgets: dict[int | str, int] = {  # accelerate names GPUs by index
        int(device[5:]) if device.startswith("cuda:") else device: size
        for device, size in max_memory.items()
    }
    first = min((key for key in budgets if isinstance(key, int)), default=None)
    extra = 0
    if first is not None:
        # infer_auto_device_map keeps room for the largest layer on the first GPU, in case a
        # layer offloaded to the cpu is streamed back there. The planner counts that streaming
        # itself, so the first GPU's budget grows by that layer, measured as accelerate measures
        # it (the same top-level modules, sizes and no-split classes).
        model = skeleton.model
        top = [
            *model.named_parameters(recurse=False),
            *model.named_children(),
            *model.named_buffers(recurse=False),
        ]
        sizes = defaultdict(int, skeleton.sizes)  # modules without tensors: 0, as there
        extra, _ = get_max_layer_size(top, sizes, no_split)
    for _ in range(4):  # two calls at most, as a rule
        asked = budgets if first is None else {**budgets, first: budgets[first] + extra}
        with quiet():
            device_map = infer(skeleton.model, max_memory=asked, **kwargs)
        if first is None or extra == 0:
            break
        # The reservation shrinks to the next largest layer once the largest is placed, so the
        # first GPU may have taken up to the difference beyond its budget: take it off, again.
        placed = sum(skeleton.sizes.get(name, 0) for name, d in device_map.items() if d == first)
        over = placed - budgets[first]
        if over <= 0:
            break
        extra = max(0, extra - over)
    order = skeleton.order
    return {
        name: spell(device_map[name], index_type="cuda")
        for name in sorted(device_map, key=lambda name: order.get(name, len(order)))
    }


def build_on_meta(config: PretrainedConfig, model_class: type, dtype: torch.dtype) -> nn.Module:
    """The model ``from_pretrained`` builds before loading: every parameter on ``meta``.

    ``_from_config`` under accelerate's ``init_empty_weights`` and ``no_init_weights`` (what
    ``from_pretrained`` wraps it in: random init of meta tensors only costs time), then
    ``tie_weights()``. Buffers stay real, as in ``from_pretrained`` (Omni's BigVGAN filters
    would take 1.2 s instead of 0.3 s on meta, to save 8 MB).
    """
    from accelerate import init_empty_weights

    builder: Any = model_class  # transformers leaves _from_config untyped
    # _from_config may write to the config (attention, dtype); the caller's stays untouched.
    with quiet(), no_init_weights(), init_empty_weights():
        model = builder._from_config(copy.deepcopy(config), **{dtype_keyword(): dtype})  # noqa: SLF001
    model.tie_weights()
    built: nn.Module = model.eval()
    return built


def build_skeleton(name: str, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A preset's full model with every parameter on ``meta``: all the shapes, no weights.

    Floating parameters in ``dtype`` (default bfloat16, as published) unless transformers keeps
    a module in another (Qwen2.5-Omni's token2wav stays float32); built buffers are real.

    Raises:
        UnsupportedModelError: As for :func:`omnifix._plan.presets.preset_config`.

    Example:
        >>> from omnifix._plan.skeleton import build_skeleton
        >>> model = build_skeleton("qwen2-vl-7b")
        >>> {p.device.type for p in model.parameters()}, round(model.num_parameters() / 1e9, 2)
        ({'meta'}, 8.29)
    """
    import torch

    model: Any = build_on_meta(
        preset_config(name), preset_model_class(name), torch.bfloat16 if dtype is None else dtype
    )
    return model  # type: ignore[no-any-return]


def _order(model: nn.Module) -> dict[str, int]:
    order: dict[str, int] = {}
    for name, module in model.named_modules():
        order.setdefault(name, len(order))
        own = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        for tensor, _ in own:
            order.setdefault(f"{name}.{tensor}" if name else tensor, len(order))
    return order


def _streamed(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """Each module with parameters of its own and their bytes, largest first.

    accelerate's ``attach_align_device_hook`` hooks every such module of an offloaded entry, and
    each hook brings that module's own parameters to the execution device for its forward.
    """
    own = (
        (name, sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)))
        for name, module in model.named_modules()
    )
    return tuple(sorted(((n, size) for n, size in own if size), key=lambda item: -item[1]))


def _skeleton(
    label: str, model: nn.Module, dtype: torch.dtype, config: PretrainedConfig | None
) -> Skeleton:
    no_split, anatomy, sizes = no_split_modules(model), describe(model), module_sizes(model)
    order, streamed = _order(model), _streamed(model)
    return Skeleton(
        label, model, type(model), dtype, no_split, anatomy, sizes, order, streamed, config
    )


def _cached(
    label: str, config: PretrainedConfig, model_class: type, dtype: torch.dtype
) -> Skeleton:
    name = f"{model_class.__module__}.{model_class.__qualname__}"
    key = (name, config.to_json_string(), str(dtype))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return replace(_CACHE[key], label=label, config=config)
    built = _skeleton(label, build_on_meta(config, model_class, dtype), dtype, config)
    with _CACHE_LOCK:
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def load_skeleton(
    model: object,
    *,
    model_class: type | None,
    dtype: torch.dtype,
    hub: Mapping[str, Any] | None = None,
) -> Skeleton:
    """The skeleton of whatever ``plan_placement`` was given, in ``dtype``.

    ``hub`` (``revision``, ``trust_remote_code``, ``token``) locates a Hub id's config.

    Raises:
        UnsupportedModelError: Not a preset, directory, config or model; a preset or model type
            the installed transformers lacks; no class known for the config.
        CheckpointError: No readable config at a path.
        InvalidArgumentError: A model class passed as ``model`` (it needs a config).
    """
    from torch import nn
    from transformers import PretrainedConfig

    if isinstance(model, type):
        raise InvalidArgumentError(
            f"plan_placement got the class {model.__name__} but no config to size it with. Pass "
            "the config as the model and the class as model_class=..., e.g. "
            f"plan_placement(config, model_class={model.__name__})."
        )
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if own == dtype or not isinstance(config, PretrainedConfig):
            return _skeleton(type(model).__name__, model, own or dtype, config)
        # Another dtype than the model was built in: build it again, as from_pretrained would.
        return _cached(type(model).__name__, config, model_class or type(model), dtype)
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if isinstance(model, str) and not Path(text).is_dir():
            # A bare name that is no preset raises the preset error (it names the closest).
            preset = find_preset(text, required="/" not in text and os.sep not in text)
            if preset is not None:
                cls = model_class or preset_model_class(preset)
                return _cached(text, preset_config(preset), cls, dtype)
        given = {key: value for key, value in (hub or {}).items() if value}
        config = read_config(text, model_class=model_class, **given)
        label = text if is_hub_id(text) else Path(text).resolve().name or text
        return _cached(label, config, model_class_for(config, model_class), dtype)
    if isinstance(model, PretrainedConfig):
        cls = model_class_for(model, model_class)
        return _cached(cls.__name__, model, cls, dtype)
    raise UnsupportedModelError(
        f"plan_placement cannot plan {model!r} (of type {type(model).__name__}): pass a built-in "
        "preset name, a checkpoint directory, a transformers config (with model_class=... if its "
        "'architectures' is empty) or a model built on the meta device."
    )
