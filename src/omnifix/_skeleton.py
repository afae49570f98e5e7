"""What the planner plans: a model skeleton on ``meta`` and transformers' own placement tools.

Turns whatever the user passed (a preset name, a checkpoint directory, a config, a built model)
into a skeleton built the way ``from_pretrained`` builds it, and wraps the sizing and
device-map functions that the installed transformers itself uses for ``device_map="auto"``:
transformers 5.x ships its own ``compute_module_sizes``/``infer_auto_device_map``
(``transformers.integrations.accelerate``), 4.x calls accelerate's, with the no-split classes
from ``model._get_no_split_modules``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import threading
import warnings
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from omnifix._device_map import spell
from omnifix._estimate import Anatomy, describe
from omnifix.errors import InvalidArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import torch
    from torch import nn
    from transformers import PretrainedConfig

__all__ = ["Skeleton", "load_skeleton", "quantized_skeleton"]

_CACHE_SIZE: Final = 4
_CACHE: OrderedDict[tuple[str, str, str], Skeleton] = OrderedDict()
_CACHE_LOCK = threading.Lock()
#: Bytes per weight value under bitsandbytes: int8 (+ per-row scales, negligible), and NF4/FP4
#: (two values a byte) plus their blockwise absmax constants (fp32 per 64 values: 1/16 byte).
_QUANTISED_BYTES: Final = {8: 1.0, 4: 0.5 + 4 / 64}


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
    #: How to build it again in another dtype (``None`` for a model the user built).
    config: PretrainedConfig | None


@contextmanager
def quiet() -> Iterator[None]:
    """Hold transformers' and accelerate's loggers at ERROR, and accelerate's warnings.

    Simulated GPUs make them warn that the devices do not exist, and a planned offload that
    offloaded buffers might not fit; the plan says what matters itself.
    """
    loggers = [logging.getLogger(name) for name in ("accelerate", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"accelerate\.")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _transformers_placement() -> Any | None:
    """Transformers 5.x's own placement module, or ``None`` where accelerate's is used (4.x)."""
    try:
        module = importlib.import_module("transformers.integrations.accelerate")
    except ImportError:  # pragma: no cover - every supported version has the module
        return None
    return module if hasattr(module, "infer_auto_device_map") else None


def module_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of every module, parameter and buffer, as the installed transformers counts them."""
    placement = _transformers_placement()
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
    """The installed transformers' ``device_map="sequential"`` for these budgets, in module order.

    Sequential (devices filled in order) rather than ``"auto"``'s balanced split: the planner sets
    each device's budget itself, and filling in order gives the fewest device boundaries.

    Args:
        skeleton: The model.
        max_memory: Bytes per device, ``"cuda:N"``, ``"cpu"`` or ``"disk"``.

    Returns:
        The map, its values spelled by :func:`omnifix._device_map.spell`.
    """
    from accelerate.utils.modeling import get_max_layer_size

    placement = _transformers_placement()
    no_split = sorted(skeleton.no_split)
    kwargs: dict[str, Any] = {"no_split_module_classes": no_split}
    if placement is not None:
        infer: Any = placement.infer_auto_device_map
        kwargs["no_placement_params"] = getattr(skeleton.model, "_no_placement_params", None)
    else:
        from accelerate import infer_auto_device_map

        infer = infer_auto_device_map
    # accelerate's max_memory names GPUs by index.
    budgets: dict[int | str, int] = {
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


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_on_meta(config: PretrainedConfig, model_class: type, dtype: torch.dtype) -> nn.Module:
    """The skeleton ``from_pretrained`` builds before loading: every parameter on ``meta``.

    accelerate's documented recipe for an empty model: ``_from_config`` under
    ``init_empty_weights``. Buffers stay real, as in ``from_pretrained``: ``include_buffers=True``
    would run Omni's BigVGAN filter design through slow meta kernels (1.2 s instead of 0.3 s) to
    save 8 MB. ``no_init_weights`` is what ``from_pretrained`` wraps the same construction in:
    random init of meta tensors does nothing but costs most of the build time on 4.x. It also
    skips the weight tying that ``init_weights`` does, so ``tie_weights()`` runs after, as
    ``from_pretrained`` does.
    """
    from accelerate import init_empty_weights

    from omnifix._attention import dtype_keyword
    from omnifix._presets import _no_init_weights, _quiet_transformers

    builder: Any = model_class  # transformers leaves _from_config untyped
    # _from_config may write to the config (attention, dtype); the caller's stays untouched.
    with _quiet_transformers(), _no_init_weights(), init_empty_weights():
        model = builder._from_config(copy.deepcopy(config), **{dtype_keyword(): dtype})  # noqa: SLF001
    model.tie_weights()
    model.eval()
    built: nn.Module = model
    return built


def _order(model: nn.Module) -> dict[str, int]:
    order: dict[str, int] = {}
    for name, module in model.named_modules():
        order.setdefault(name, len(order))
        own = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        for tensor, _ in own:
            order.setdefault(f"{name}.{tensor}" if name else tensor, len(order))
    return order


def _skeleton(
    label: str,
    model: nn.Module,
    dtype: torch.dtype,
    config: PretrainedConfig | None,
) -> Skeleton:
    no_split = no_split_modules(model)
    return Skeleton(
        label=label,
        model=model,
        model_class=type(model),
        dtype=dtype,
        no_split=no_split,
        anatomy=describe(model),
        sizes=module_sizes(model),
        order=_order(model),
        config=config,
    )


def _cached(
    label: str, config: PretrainedConfig, model_class: type, dtype: torch.dtype
) -> Skeleton:
    key = (
        f"{model_class.__module__}.{model_class.__qualname__}",
        config.to_json_string(),
        str(dtype),
    )
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            hit = _CACHE[key]
            return replace(hit, label=label, config=config)
    built = _skeleton(label, build_on_meta(config, model_class, dtype), dtype, config)
    with _CACHE_LOCK:
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def quantized_skeleton(skeleton: Skeleton, bits: int) -> Skeleton:
    """A fresh copy of ``skeleton`` whose linear weights are stored as bitsandbytes stores them.

    Every ``nn.Linear`` weight in the skeleton's dtype becomes an int8 (8 bits) or packed uint8
    (4 bits, with its absmax constants) tensor of the size bitsandbytes keeps, except the output
    heads (``lm_head``), which transformers never quantises, and modules kept in float32. The
    planner then sizes and places it like any model: an estimate of ``load_in_8bit``/
    ``load_in_4bit``, not a load.
    """
    import torch
    from torch import nn

    if skeleton.config is None:
        raise UnsupportedModelError(
            f"Cannot re-plan {skeleton.label} with quantised weights: it was passed as a built "
            "model. Pass its config (or checkpoint directory) to plan_placement instead."
        )
    model = build_on_meta(skeleton.config, skeleton.model_class, skeleton.dtype)
    heads = {skeleton.anatomy.lm_head}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or name in heads:
            continue
        if weight.dtype != skeleton.dtype or name.endswith(("lm_head", "codec_head")):
            continue
        stored = int(weight.numel() * _QUANTISED_BYTES[bits])
        module._parameters["weight"] = nn.Parameter(  # noqa: SLF001 - sizing only, never run
            torch.empty(stored, dtype=torch.uint8, device="meta"), requires_grad=False
        )
    return _skeleton(f"{skeleton.label} ({bits}-bit)", model, skeleton.dtype, skeleton.config)


# --------------------------------------------------------------------------------------------
# What the user passed
# --------------------------------------------------------------------------------------------


def _class_named(architectures: object) -> type | None:
    """The first class of a config's ``architectures`` that transformers has."""
    import transformers

    for architecture in architectures if isinstance(architectures, (list, tuple)) else ():
        found = getattr(transformers, str(architecture), None)
        if isinstance(found, type):
            return found
    return None


def _class_for(config: PretrainedConfig) -> type:
    """The class ``from_pretrained`` of this config's checkpoint would build."""
    import transformers

    named = _class_named(getattr(config, "architectures", None))
    if named is not None:
        return named
    # No architectures in the config: the class the auto factories pick (the lookup their
    # from_config does), most specific first.
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        mapping = getattr(getattr(transformers, auto, None), "_model_mapping", None)
        try:
            return mapping[type(config)]  # type: ignore[no-any-return,index]
        except (KeyError, TypeError):
            continue
    raise UnsupportedModelError(
        f"Cannot tell which model class to build for a {type(config).__name__}: its "
        "'architectures' field is empty and no transformers auto class knows it. Pass the class "
        "as model_class=..."
    )


def _read_config(reader: Any, path: str) -> PretrainedConfig:
    from transformers import AutoConfig, PretrainedConfig

    try:
        config: PretrainedConfig = reader.from_pretrained(path)
    except ValueError:
        named = _class_named(PretrainedConfig.get_config_dict(path)[0].get("architectures"))
        if reader is not AutoConfig or named is None:
            raise
        config = named.config_class.from_pretrained(path)  # type: ignore[attr-defined]
    return config


def _config_from_path(path: str, model_class: type | None) -> PretrainedConfig:
    """The config ``from_pretrained(path)`` would read.

    The class's own config class when the class is known (as ``from_pretrained`` does), else
    ``AutoConfig``, else the class named in ``config.json`` (sub-model types such as
    ``qwen2_5_omni_thinker``, which 4.5x's AutoConfig does not register).
    """
    from transformers import AutoConfig

    reader: Any = getattr(model_class, "config_class", None) or AutoConfig
    try:
        with quiet():  # the rope_scaling notices every load of these configs logs
            config = _read_config(reader, path)
    except (OSError, ValueError) as error:
        where = "directory" if Path(path).is_dir() else "name"
        raise UnsupportedModelError(
            f"Cannot read a model config from the {where} {path!r}: {error}. Pass a built-in "
            "preset name (omnifix._presets.PRESETS), a directory with a config.json, or a "
            "transformers config."
        ) from error
    return config


def _preset(name: str) -> tuple[PretrainedConfig, type] | None:
    """The preset's config and class; ``None`` for a hub-style id that is no preset.

    A bare name that is no preset raises the preset error, which suggests the closest one.
    """
    from omnifix._presets import _lookup, preset_config, preset_model_class

    try:
        _lookup(name)
    except UnsupportedModelError:
        if "/" in name or os.sep in name:
            return None
        raise
    return preset_config(name), preset_model_class(name)


def load_skeleton(model: object, *, model_class: type | None, dtype: torch.dtype) -> Skeleton:
    """The skeleton of whatever ``plan_placement`` was given, in ``dtype``.

    Raises:
        UnsupportedModelError: Not a preset, directory, config or model; or the config cannot be
            read, or no class is known for it.
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
            label = type(model).__name__
            return _skeleton(label, model, own or dtype, config)
        # Another dtype than the model was built in: build it again, as from_pretrained would.
        return _cached(type(model).__name__, config, model_class or type(model), dtype)
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        preset = _preset(text) if isinstance(model, str) and not Path(text).is_dir() else None
        if preset is not None:
            config, cls = preset
            return _cached(text, config, model_class or cls, dtype)
        config = _config_from_path(text, model_class)
        label = Path(text).resolve().name or text
        return _cached(label, config, model_class or _class_for(config), dtype)
    if isinstance(model, PretrainedConfig):
        cls = model_class or _class_for(model)
        return _cached(cls.__name__, model, cls, dtype)
    raise UnsupportedModelError(
        f"plan_placement cannot plan a {type(model).__name__}: pass a built-in preset name, a "
        "checkpoint directory, a transformers config (with model_class=... if its "
        "'architectures' is empty) or a model built on the meta device."
    )
