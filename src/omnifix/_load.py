"""``load_safely``: plan the placement, refuse what does not fit, load, check, report.

``from_pretrained(..., device_map="auto")`` degrades silently: weights that do not fit go to the
cpu or to disk behind hooks (and ``.item()`` later fails on a meta tensor), activations all land on
the first GPU, and the embedding seam of a split model mixes devices. :func:`load_safely` does the
same load with the plan made first:

1. read the config (not the weights) and pick the model class;
2. measure the budgets of the devices asked for (free GPU memory now, available RAM), capped by
   ``max_memory``; choose the dtype and the attention implementation for those devices;
3. ask :func:`omnifix.plan_placement` for an explicit ``device_map`` that holds the weights and
   the workload's peak; refuse with :class:`omnifix.InsufficientMemoryError` (numbers per device,
   and the options that would fit) before anything is allocated when it does not fit;
4. call the real ``from_pretrained`` with that map, the dtype under the keyword the installed
   transformers expects, and every other keyword untouched;
5. check the result (:func:`omnifix.assert_no_meta`); when the model spans several devices,
   replace accelerate's hooks with lean ones (:func:`omnifix.lean_dispatch`, unless offloaded
   or ``hooks="accelerate"``) and pin the input embeddings (:func:`omnifix.pin_embeddings`);
   remember the plan for :func:`placement_report`.

A refused or failed load leaves no model behind: references are dropped (including those held by
the failed call's traceback), the garbage collector runs and the CUDA cache is emptied before the
error propagates.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar, overload

from omnifix._devices import device_order, offloads
from omnifix.errors import (
    CheckpointError,
    DeviceError,
    InsufficientMemoryError,
    InvalidArgumentError,
    OmnifixError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from omnifix._plan import PlacementPlan, Workload
    from omnifix._types import DeviceLike

    _M = TypeVar("_M", bound=PreTrainedModel)

#: An attention implementation, or a dict of them per sub-config (nested like the configs).
AttentionRequest: TypeAlias = "str | Mapping[str, AttentionRequest]"

__all__ = [
    "AttentionRequest",
    "DeviceUsage",
    "PlacementReport",
    "load_safely",
    "placement_report",
]

#: ``from_pretrained`` keywords that also locate the config (passed to ``AutoConfig`` too).
_CONFIG_KWARGS: Final = (
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "use_auth_token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "code_revision",
)
#: How many entries of an explicit device_map an error message lists.
_SHOWN_ENTRIES: Final = 6


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


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
            ``None`` when the model was not planned by omnifix or the plan does not use the
            device.
        budget: The budget the plan had for the device; ``None`` as above, and for the disk
            (no limit).
    """

    device: str
    weights: int
    offloaded: int = 0
    predicted_peak: int | None = None
    budget: int | None = None


@dataclass(frozen=True, kw_only=True)
class PlacementReport:
    """Where a model's weights are, and what its plan predicted (see :func:`placement_report`).

    Bytes are measured from the model when the report is made; strategy, reason and the
    predictions come from the plan :func:`load_safely` made (for other models they are inferred
    from the model, and the predictions are ``None``).

    Attributes:
        model: The model's class name.
        strategy: ``"single"`` (one device), ``"split"`` (several GPUs), ``"offload"`` (some
            weights on cpu/disk behind accelerate hooks), or ``"explicit"`` (a ``device_map``
            the caller gave ``load_safely``).
        reason: Why: the plan's reason, or how the strategy was inferred.
        planned: Whether the model was loaded (and planned) by :func:`load_safely`.
        dtype: The dtype it was loaded in; for other models the floating dtype holding the most
            bytes. Modules that pin their own dtype (Qwen2.5-Omni's float32 token2wav) show in
            ``dtypes``.
        dtypes: Bytes per dtype name, measured.
        attn_implementation: The model config's attention implementation (``None`` without one).
        attention: Sub-models running another implementation than the model's, by module name.
        devices: One entry per device holding weights or planned to, GPUs first.
        uninitialised: Bytes of tensors on ``meta`` with no data anywhere.
        input_device: Where to put ``input_ids`` (:func:`omnifix.input_device`); ``None`` when it
            cannot be told.
        pinned_embeddings: Input embeddings :func:`load_safely` pinned (split models only).
        hooks: The device hooks on the model now: ``"none"``, ``"lean"`` (omnifix's, from
            :func:`omnifix.lean_dispatch`: what :func:`load_safely` uses for a split) or
            ``"accelerate"`` (accelerate's ``AlignDevicesHook`` and the like: offloaded models,
            ``hooks="accelerate"``, or models dispatched by others).
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

    def usage(self, device: DeviceLike) -> DeviceUsage | None:
        """The entry of ``device`` (``"cuda:0"``, ``0``, ``"cpu"``, a :class:`torch.device`)."""
        key = _device_key(device)
        return next((usage for usage in self.devices if usage.device == key), None)

    def __str__(self) -> str:
        """A short table: strategy, dtype and attention, then bytes per device."""
        from omnifix._meta import _human_bytes

        def size(value: int | None) -> str:
            return "-" if value is None else _human_bytes(value)

        dtype = "unknown" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        attention = self.attn_implementation or "unknown"
        if self.attention:
            attention += " (" + ", ".join(f"{k}: {v}" for k, v in self.attention.items()) + ")"
        lines = [
            f"{self.model}: {self.strategy} - {self.reason}",
            f"dtype {dtype}, attention {attention}, inputs on {self.input_device or 'unknown'}",
        ]
        rows = [("device", "weights", "offloaded", "predicted peak", "budget")]
        rows += [
            (
                usage.device,
                size(usage.weights),
                size(usage.offloaded) if usage.offloaded else "-",
                size(usage.predicted_peak),
                size(usage.budget),
            )
            for usage in self.devices
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            for row in rows
        ]
        if self.uninitialised:
            lines.append(f"uninitialised (on meta, no data): {size(self.uninitialised)}")
        if self.pinned_embeddings:
            lines.append(f"pinned embeddings: {', '.join(self.pinned_embeddings)}")
        if self.hooks == "lean":
            lines.append("hooks: lean (omnifix's, one per device_map entry; see lean_dispatch)")
        elif self.hooks == "accelerate":
            why = " (offloaded weights are streamed by them)" if self.offloaded else ""
            lines.append(f"hooks: accelerate{why}")
        return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class _LoadRecord:
    """What :func:`load_safely` knew when it loaded a model; the measured part comes later."""

    strategy: str
    reason: str
    dtype: torch.dtype
    predicted: dict[str, tuple[int, int | None]]  # device -> (predicted peak, budget)
    pinned: tuple[str, ...]


# Keyed by the model itself, weakly: the record never keeps a model alive and never touches its
# state_dict (nothing is registered on the module).
_RECORDS: weakref.WeakKeyDictionary[nn.Module, _LoadRecord] = weakref.WeakKeyDictionary()


def _device_key(device: object) -> str:
    """One spelling per device: ``0``, ``"cuda:0"``, ``torch.device("cuda", 0)`` -> ``"cuda:0"``."""
    import torch

    if isinstance(device, torch.device):
        return str(device)
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device).strip().lower()
    return f"cuda:{text}" if text.isdigit() else text


def _measure(model: nn.Module) -> tuple[Counter[str], Counter[str]]:
    """Bytes per device of real tensors, and bytes per dtype of all tensors (tied ones once)."""
    per_device: Counter[str] = Counter()
    per_dtype: Counter[str] = Counter()
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        per_dtype[str(tensor.dtype).removeprefix("torch.")] += size
        if not tensor.is_meta:
            per_device[str(tensor.device)] += size
    return per_device, per_dtype


def _execution_devices(model: nn.Module) -> set[str]:
    """Where the modules that own weights compute (accelerate's hook device, else the weights')."""
    from omnifix._modules import execution_device

    found: set[str] = set()
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        device = execution_device(module)
        if device is not None and device.type != "meta":
            found.add(str(device))
    return found


def _attention_by_module(model: nn.Module) -> tuple[str | None, dict[str, str]]:
    """The model's attention implementation, and its sub-models' that differ from it."""
    transformers = sys.modules.get("transformers")  # not imported: not a transformers model
    if transformers is None:
        return None, {}
    models = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, transformers.PreTrainedModel)
    ]

    def implementation(module: nn.Module) -> str | None:
        value = getattr(getattr(module, "config", None), "_attn_implementation", None)
        return value if isinstance(value, str) else None

    top = implementation(model)
    different = {name: implementation(module) for name, module in models if name}
    return top, {name: value for name, value in different.items() if value and value != top}


def _inferred(model: nn.Module, offloaded: Mapping[str, int]) -> tuple[str, str]:
    executing = _execution_devices(model)
    if offloaded:
        return "offload", "inferred: some weights are offloaded behind accelerate hooks"
    if len(executing) > 1:
        return "split", f"inferred: modules run on {', '.join(sorted(executing))}"
    return "single", "inferred: every module runs on one device"


def placement_report(model: nn.Module) -> PlacementReport:
    """Where ``model``'s weights are, how it was placed, and what the plan predicted.

    For a model loaded by :func:`load_safely` the report carries the plan: strategy and reason,
    the dtype and attention it loaded with, and per device the predicted peak and the budget.
    Any other model gets a report from the model alone (strategy inferred from its placement,
    no predictions). Bytes are always measured now, from the parameters and buffers.

    Args:
        model: Any :class:`torch.nn.Module`.

    Returns:
        A :class:`PlacementReport`; ``str(report)`` is a short table.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from omnifix._load import placement_report
        >>> report = placement_report(torch.nn.Linear(4, 2))
        >>> report.strategy, report.planned, report.devices[0].device, report.devices[0].weights
        ('single', False, 'cpu', 40)
    """
    from torch import nn

    from omnifix._devices import input_device
    from omnifix._dispatch import hooks_in_place
    from omnifix._meta import find_meta_tensors

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"placement_report needs a torch.nn.Module, got {type(model).__name__}; pass the "
            "model itself (e.g. the result of load_safely or from_pretrained)."
        )
    per_device, per_dtype = _measure(model)
    meta = find_meta_tensors(model)
    offloaded: Counter[str] = Counter()
    for tensor in meta.offloaded:
        offloaded[tensor.offloaded_to or "unknown"] += tensor.nbytes
    record = _RECORDS.get(model)
    if record is not None:
        strategy, reason = record.strategy, record.reason
        dtype: torch.dtype | None = record.dtype
    else:
        strategy, reason = _inferred(model, offloaded)
        dtype = _largest_floating(per_dtype)
    predicted = record.predicted if record is not None else {}
    names = {*per_device, *offloaded, *predicted}
    devices = tuple(
        DeviceUsage(
            device=name,
            weights=per_device[name] + offloaded[name],
            offloaded=offloaded[name],
            predicted_peak=predicted[name][0] if name in predicted else None,
            budget=predicted[name][1] if name in predicted else None,
        )
        for name in sorted(names, key=device_order)
    )
    top, different = _attention_by_module(model)
    try:
        inputs_on: torch.device | None = input_device(model)
    except OmnifixError:
        inputs_on = None
    return PlacementReport(
        model=type(model).__name__,
        strategy=strategy,
        reason=reason,
        planned=record is not None,
        dtype=dtype,
        dtypes=dict(per_dtype),
        attn_implementation=top,
        attention=different,
        devices=devices,
        uninitialised=sum(tensor.nbytes for tensor in meta.uninitialised),
        input_device=inputs_on,
        pinned_embeddings=record.pinned if record is not None else (),
        hooks=hooks_in_place(model),
    )


def _largest_floating(per_dtype: Mapping[str, int]) -> torch.dtype | None:
    import torch

    floating = [
        (count, name)
        for name, count in per_dtype.items()
        if isinstance(getattr(torch, name, None), torch.dtype)
        and getattr(torch, name).is_floating_point
    ]
    return getattr(torch, max(floating)[1]) if floating else None


# --------------------------------------------------------------------------------------------
# Before loading: config, class, devices, budgets
# --------------------------------------------------------------------------------------------


def _config_and_class(
    pretrained: str | os.PathLike[str], kwargs: Mapping[str, Any], model_class: type[Any] | None
) -> tuple[Any, type[Any]]:
    """The config ``from_pretrained`` will use (read now, without the weights), and the class.

    Read the way ``from_pretrained`` reads it: with the concrete class's ``config_class`` (so
    configs the Auto mappings lack, such as Qwen2.5-Omni's thinker on 4.5x, work), else with
    ``AutoConfig``.
    """
    import transformers

    given = kwargs.get("config")
    if isinstance(given, transformers.PretrainedConfig):
        return given, _model_class(given, model_class)
    source = pretrained if given is None else given
    hub = {key: kwargs[key] for key in _CONFIG_KWARGS if key in kwargs}
    try:
        raw, _ = transformers.PretrainedConfig.get_config_dict(source, **hub)
    # transformers raises OSError for a missing directory or config on 4.45, huggingface_hub's
    # HFValidationError (a ValueError) for a path that is no repo id on 4.57, json errors for a
    # broken config.json (ValueError too): all mean "no readable checkpoint here".
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"Cannot read the config of {os.fspath(source)!r}: {error}. Pass the directory "
            "that holds config.json and the weights (as written by save_pretrained), or a Hub "
            "model id such as 'Qwen/Qwen2.5-VL-7B-Instruct' with network access or a warm cache."
        ) from error
    concrete = model_class if _is_concrete(model_class) else None
    if model_class is None:
        concrete = _named_class(raw.get("architectures"))
    if concrete is not None:
        return concrete.config_class.from_pretrained(source, **hub), concrete
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hub)
    except ValueError as error:  # a model type this transformers does not know
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} cannot read the config of "
            f"{os.fspath(source)!r}: {error}. Upgrade transformers, or pass model_class= (the "
            "class that loads it, e.g. a remote-code class with trust_remote_code=True)."
        ) from error
    return config, _model_class(config, model_class)


def _is_concrete(model_class: type[Any] | None) -> bool:
    """A ``PreTrainedModel`` subclass rather than an Auto class (which has a model mapping)."""
    return model_class is not None and getattr(model_class, "_model_mapping", None) is None


def _named_class(architectures: object) -> type[Any] | None:
    """The first class of ``architectures`` that the installed transformers ships."""
    import transformers

    for name in architectures if isinstance(architectures, list) else []:
        found = getattr(transformers, str(name), None)
        if isinstance(found, type):
            return found
    return None


def _model_class(config: Any, model_class: type[Any] | None) -> type[Any]:
    """The concrete class to load: ``model_class``, its Auto mapping, or the architecture."""
    import transformers

    if _is_concrete(model_class):
        assert model_class is not None  # noqa: S101 - _is_concrete checked it
        return model_class
    if model_class is not None:
        try:  # an Auto class: the concrete class it would load, so the plan sizes the same model
            concrete: type[Any] = model_class._model_mapping[type(config)]  # noqa: SLF001
        except (KeyError, ValueError) as error:
            raise UnsupportedModelError(
                f"{model_class.__name__} has no model class for {type(config).__name__} (model "
                f"type {getattr(config, 'model_type', '?')!r}). Pass the concrete class, e.g. "
                f"model_class=transformers.{(config.architectures or ['<ClassName>'])[0]}."
            ) from error
        return concrete
    found = _named_class(getattr(config, "architectures", None))
    if found is not None:
        return found
    architectures = list(getattr(config, "architectures", None) or [])
    named = f"names {architectures}" if architectures else "names no architecture"
    raise UnsupportedModelError(
        f"The config ({type(config).__name__}) {named} that transformers "
        f"{transformers.__version__} ships. Pass model_class= (e.g. "
        "transformers.AutoModelForCausalLM, or the remote-code class), or upgrade transformers."
    )


def _every_gpu(device: DeviceLike) -> bool:
    """Whether ``device`` asks for every visible GPU (the words ``resolve_device_map`` spreads)."""
    from omnifix._devices import _is_rocm

    words = ("auto", "cuda", "gpu", *(("rocm", "hip") if _is_rocm() else ()))
    return device is None or (isinstance(device, str) and device.strip().lower() in words)


def _targets(device: DeviceLike) -> list[torch.device]:
    """The devices ``device`` asks for: every visible GPU for "auto"/"cuda", one GPU, or the cpu."""
    import torch

    from omnifix._devices import cuda_device_count, normalize_device

    if _every_gpu(device):
        count = cuda_device_count()
        if count:
            return [torch.device("cuda", index) for index in range(count)]
    resolved = normalize_device(device)  # raises for "cuda" on a machine without GPUs
    if resolved.type not in ("cuda", "cpu"):
        raise DeviceError(
            f"device={device!r} resolves to {resolved}, and load_safely plans memory for CUDA "
            "GPUs and the cpu only. Pass device='cpu' or a CUDA device, or load with "
            f"from_pretrained(device_map={{'': '{resolved}'}}) and check the result with "
            "omnifix.assert_no_meta."
        )
    return [resolved]


def _budgets(
    device: DeviceLike,
    targets: list[torch.device],
    max_memory: Mapping[Any, int | str] | None,
    *,
    allow_offload: bool,
) -> Mapping[DeviceLike, int | str] | None:
    """Free memory of each target (and the host, to offload to), capped by ``max_memory``.

    ``None`` when the planner can measure the same devices itself (every visible GPU, no caps):
    it then knows the budgets are free memory measured after the CUDA context was created.
    """
    import torch

    from omnifix._devices import normalize_device
    from omnifix._plan.budgets import host_memory
    from omnifix._units import parse_size

    if _every_gpu(device) and max_memory is None:
        return None
    cpu = torch.device("cpu")
    devices = [*targets, *([cpu] if allow_offload and cpu not in targets else [])]
    budgets: dict[DeviceLike, int] = {
        _device_key(target): (
            int(torch.cuda.mem_get_info(target)[0]) if target.type == "cuda" else host_memory()
        )
        for target in devices
    }
    for key, cap in (max_memory or {}).items():
        name = _device_key(normalize_device(key))
        if name == "cpu" and name not in budgets:
            continue  # accelerate-style max_memory names the cpu; nothing is offloaded here
        if name not in budgets:
            used = ", ".join(map(str, budgets))
            raise InvalidArgumentError(
                f"max_memory names {key!r}, which this load does not use (it plans for {used}). "
                "Drop that entry, or choose the device with device=."
            )
        budgets[name] = min(budgets[name], parse_size(cap, what=f"max_memory[{key!r}]"))
    return budgets


def _explicit_map(
    device_map: object, *, allow_offload: bool, device: DeviceLike, max_memory: object
) -> dict[str, int | str]:
    """A caller's ``device_map``: honoured when it is an explicit dict, checked first."""
    from omnifix._devices import resolve_device_map
    from omnifix._meta import _offloaded_entries

    if not isinstance(device_map, Mapping):
        raise InvalidArgumentError(
            f"device_map={device_map!r}: load_safely makes the device_map itself from its plan, "
            "and strategy words ('auto', 'balanced', ...) are what it replaces. Pass "
            "device='cuda:1' (or 'cpu', or 'auto' for every GPU) instead, or an explicit "
            "{module_name: device} dict to place modules yourself."
        )
    if not (device is None or device == "auto") or max_memory is not None:
        raise InvalidArgumentError(
            "An explicit device_map places every module itself, so device= and max_memory= "
            "have nothing to choose. Drop them, or drop device_map= and let load_safely plan."
        )
    normalized = resolve_device_map(device_map).device_map
    assert isinstance(normalized, dict)  # noqa: S101 - a dict request resolves to a dict
    offloaded = _offloaded_entries(normalized)
    if offloaded and not allow_offload:
        entries = list(offloaded.items())
        shown = ", ".join(f"{name!r}: {value!r}" for name, value in entries[:_SHOWN_ENTRIES])
        more = f" and {len(entries) - _SHOWN_ENTRIES} more" if len(entries) > _SHOWN_ENTRIES else ""
        raise InvalidArgumentError(
            f"The device_map offloads {shown}{more}: accelerate keeps those weights off the GPU "
            "and they are meta tensors outside forward(). Map them to GPUs, or pass "
            "allow_offload=True to accept the offload knowingly."
        )
    return normalized


def _attention_for(
    requested: AttentionRequest,
    *,
    config: Any,
    dtype: torch.dtype,
    capabilities: tuple[tuple[int, int], ...],
    model_class: type[Any],
    strict: bool,
) -> tuple[AttentionRequest, str]:
    """The implementation(s) to pass, and the one to plan for (the most memory-hungry)."""
    from omnifix._attention import choose_attention

    if not isinstance(requested, Mapping):
        # stacklevel 4: choose_attention <- here <- load_safely <- the caller.
        chosen = choose_attention(
            requested,
            dtype=dtype,
            capabilities=capabilities,
            model_class=model_class,
            strict=strict,
            stacklevel=4,
        )
        return chosen, chosen
    if not _config_takes_attention_dict():
        import transformers

        raise UnsupportedModelError(
            f"attn_implementation={dict(requested)!r}: transformers {transformers.__version__} "
            "applies one implementation to the whole model and does not take a per-sub-config "
            "dict. Pass one name (e.g. 'sdpa'), or upgrade transformers to 4.57 or newer."
        )
    leaves: list[str] = []
    chosen_map = _attention_dict(
        requested,
        config,
        dtype=dtype,
        capabilities=capabilities,
        strict=strict,
        leaves=leaves,
        stacklevel=5,
    )
    order = ("eager", "flex_attention", "sdpa")
    planned = next((name for name in order if name in leaves), leaves[0] if leaves else "sdpa")
    return chosen_map, planned


def _attention_dict(
    requested: Mapping[str, AttentionRequest],
    config: Any,
    *,
    dtype: torch.dtype,
    capabilities: tuple[tuple[int, int], ...],
    strict: bool,
    leaves: list[str],
    stacklevel: int,
) -> dict[str, AttentionRequest]:
    """Check the keys against the config's sub-configs, and choose each leaf.

    The model class's ``_supports_*`` flags are the top model's, so they are not applied here;
    each sub-model checks its own at load time.
    """
    from omnifix._attention import choose_attention

    sub_configs = getattr(config, "sub_configs", None) or {}
    chosen: dict[str, AttentionRequest] = {}
    for key, value in requested.items():
        if key and key not in sub_configs:
            valid = ", ".join(repr(name) for name in ["", *sub_configs])
            raise InvalidArgumentError(
                f"attn_implementation has the key {key!r}, which is no sub-config of "
                f"{type(config).__name__}, so transformers would ignore it. Use one of {valid} "
                "('' is the model itself)."
            )
        if isinstance(value, Mapping):
            chosen[key] = _attention_dict(
                value,
                getattr(config, key, None),
                dtype=dtype,
                capabilities=capabilities,
                strict=strict,
                leaves=leaves,
                stacklevel=stacklevel + 1,
            )
            continue
        leaf = choose_attention(
            value, dtype=dtype, capabilities=capabilities, strict=strict, stacklevel=stacklevel
        )
        leaves.append(leaf)
        chosen[key] = leaf
    return chosen


def _config_takes_attention_dict() -> bool:
    """Whether the installed transformers spreads an attention dict over sub-configs."""
    from transformers import PretrainedConfig

    probe = PretrainedConfig()
    try:
        probe._attn_implementation = {"": "eager"}  # noqa: SLF001 - the setter under test
    except (TypeError, ValueError, AttributeError):
        return False
    return getattr(probe, "_attn_implementation", None) == "eager"


# --------------------------------------------------------------------------------------------
# Loading, and cleaning up after a failure
# --------------------------------------------------------------------------------------------


def _release(error: BaseException | None = None) -> None:
    """Free what a failed load allocated: frames of the failed call, cycles, the CUDA cache."""
    import torch

    # A traceback keeps every frame of from_pretrained alive, and with them the half-built
    # model; clearing their locals (executing frames are skipped) lets it go. Errors chained
    # inside transformers (a worker thread's, a re-raised one) carry frames too.
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a no-op when this process never initialised CUDA


def _broken_weights(pretrained: str | os.PathLike[str], subfolder: str) -> list[str]:
    """The local safetensors files whose header does not read, for the error message."""
    from pathlib import Path

    folder = Path(pretrained) / subfolder
    paths = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return [path.name for path in paths if not _opens(str(path))]


def _opens(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any failure to open means "broken" here
        return False


def _load_error(
    error: BaseException, pretrained: str | os.PathLike[str], kwargs: Mapping[str, Any]
) -> BaseException | None:
    """The omnifix error for a failed ``from_pretrained``, or ``None`` to re-raise as is."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return InsufficientMemoryError(
            f"Loading {os.fspath(pretrained)!r} ran out of GPU memory although the plan said it "
            f"fits: {error}. Another process probably took memory after the plan measured it, "
            "or the checkpoint's weights are larger than its config says. Nothing stays loaded. "
            "Fix: free the GPU (or pass device= to use another one), or lower max_memory= for "
            "that GPU to leave room, then retry."
        )
    checkpoint = isinstance(error, (OSError, EOFError)) or type(error).__module__.startswith(
        "safetensors"
    )
    if not checkpoint:
        return None
    broken = _broken_weights(pretrained, str(kwargs.get("subfolder", "")))
    files = f" Unreadable weight files: {', '.join(broken)}." if broken else ""
    return CheckpointError(
        f"Reading the weights of {os.fspath(pretrained)!r} failed: {type(error).__name__}: "
        f"{error}.{files} The checkpoint is incomplete or corrupt (an interrupted download or "
        "copy), or lacks weight files. Nothing stays loaded. Fix: download or copy the "
        "checkpoint again (huggingface-cli download <repo> --force-download for a Hub model), "
        "then retry."
    )


def _offload_folder(device_map: Mapping[str, object], kwargs: dict[str, Any]) -> str | None:
    """A temporary offload folder when the map sends modules to disk and the caller gave none."""
    if "disk" not in device_map.values() or kwargs.get("offload_folder") is not None:
        return None
    import tempfile

    folder = tempfile.mkdtemp(prefix="omnifix-offload-")
    kwargs["offload_folder"] = folder
    return folder


@overload
def load_safely(
    pretrained: str | os.PathLike[str],
    *,
    model_class: type[_M],
    device: DeviceLike = "auto",
    dtype: torch.dtype | str = "auto",
    attn_implementation: AttentionRequest = "auto",
    max_memory: Mapping[int | str, int | str] | None = None,
    workload: Workload | None = None,
    allow_offload: bool = False,
    strict: bool = False,
    hooks: Literal["lean", "accelerate"] = "lean",
    **from_pretrained_kwargs: Any,
) -> _M: ...


@overload
def load_safely(
    pretrained: str | os.PathLike[str],
    *,
    model_class: type[Any] | None = None,  # None, or an Auto class such as AutoModelForCausalLM
    device: DeviceLike = "auto",
    dtype: torch.dtype | str = "auto",
    attn_implementation: AttentionRequest = "auto",
    max_memory: Mapping[int | str, int | str] | None = None,
    workload: Workload | None = None,
    allow_offload: bool = False,
    strict: bool = False,
    hooks: Literal["lean", "accelerate"] = "lean",
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel: ...


def load_safely(  # noqa: C901, PLR0915 - one linear recipe, commented step by step
    pretrained: str | os.PathLike[str],
    *,
    model_class: type[Any] | None = None,
    device: DeviceLike = "auto",
    dtype: torch.dtype | str = "auto",
    attn_implementation: AttentionRequest = "auto",
    max_memory: Mapping[int | str, int | str] | None = None,
    workload: Workload | None = None,
    allow_offload: bool = False,
    strict: bool = False,
    hooks: Literal["lean", "accelerate"] = "lean",
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a transformers model where it fits, or refuse with numbers before loading anything.

    Plans the placement first (:func:`omnifix.plan_placement`: weights, KV cache and activation
    peak of ``workload`` per device), then calls the real ``from_pretrained`` with the plan's
    explicit ``device_map``. One GPU when everything fits there; else a split over the GPUs with
    room for each one's activations; else :class:`omnifix.InsufficientMemoryError`. Never the
    cpu or disk unless ``allow_offload=True``.

    Args:
        pretrained: A local checkpoint directory (as written by ``save_pretrained``), or a Hub
            model id (transformers resolves it, as ``from_pretrained`` would).
        model_class: The class to load with: a ``PreTrainedModel`` subclass or an Auto class such
            as ``AutoModelForCausalLM``. ``None``: the class the config's ``architectures`` names.
        device: ``"auto"`` (every visible GPU, else the cpu), ``"cuda"`` (every GPU),
            ``"cuda:1"`` or ``1`` (that GPU only), or ``"cpu"``.
        dtype: ``"auto"`` (bfloat16 on Ampere or newer GPUs, float16 on older ones, float32 on
            the cpu) or a dtype/name. Passed as ``dtype=`` or ``torch_dtype=``, whichever the
            installed transformers expects; ``torch_dtype=`` is accepted as an alias.
        attn_implementation: ``"auto"`` (flash_attention_2 where it can run, else sdpa), an
            implementation name, or (transformers 4.57+) a per-sub-config dict. One that cannot
            run here falls back to sdpa with an :class:`omnifix.OmnifixWarning`.
        max_memory: Caps on the measured budgets, e.g. ``{0: "20GiB", "cpu": "64GiB"}``.
        workload: What the model will be asked to do (:class:`omnifix.Workload`); sizes the KV
            cache and activations. ``None``: the planner's default.
        allow_offload: Accept a plan that keeps weights on the cpu or disk behind accelerate
            hooks (an offload folder is created when needed and none is given).
        strict: Raise instead of falling back when the requested attention cannot run.
        hooks: How a model split over several GPUs moves tensors between them. ``"lean"``
            (default): :func:`omnifix.lean_dispatch` replaces accelerate's hooks with one light
            hook per ``device_map`` entry. ``"accelerate"``: keep accelerate's hooks (a hook on
            every module with weights). Offloaded models always keep accelerate's hooks, which
            stream their weights; :func:`placement_report` says which hooks are in place.
        **from_pretrained_kwargs: Forwarded untouched to ``from_pretrained`` (``revision``,
            ``subfolder``, ``trust_remote_code``, ``quantization_config``, config overrides...).
            An explicit ``device_map`` dict is honoured (checked, not planned); a strategy word
            is refused, since planning is what replaces it.

    Returns:
        The model, in eval mode, with no meta tensors (except offloaded ones when
        ``allow_offload=True``) and, when it spans several devices, lean hooks (unless
        ``hooks="accelerate"`` or offloaded) and its input embeddings pinned.
        :func:`placement_report` tells where everything went.

    Raises:
        InsufficientMemoryError: The plan does not fit the budgets (need vs free per device, and
            options that would fit), or loading ran out of GPU memory.
        CheckpointError: The checkpoint is missing, unreadable, incomplete or corrupt.
        MetaTensorError: Weights ended up on ``meta`` (e.g. keys missing from the checkpoint).
        AttentionUnavailableError: ``strict=True`` and the attention cannot run here.
        UnsupportedModelError: No model class for the config, or a dict of attention
            implementations on a transformers that does not take one.
        InvalidArgumentError: A bad dtype, attention name, ``max_memory``, ``device_map`` or
            ``hooks``.
        DeviceError: A device that is malformed, missing, or not a CUDA GPU or the cpu.

    Example:
        >>> import tempfile, torch
        >>> import omnifix.testing as ot
        >>> from omnifix._load import load_safely, placement_report
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = ot.save_tiny_model("qwen2", tmp)
        ...     model = load_safely(path, device="cpu")
        >>> model.dtype, model.config._attn_implementation
        (torch.float32, 'sdpa')
        >>> report = placement_report(model)
        >>> report.strategy, [usage.device for usage in report.devices]
        ('single', ['cpu'])
    """
    from omnifix._attention import choose_dtype, dtype_keyword, gpu_capabilities
    from omnifix._meta import assert_no_meta
    from omnifix._plan import plan_placement, require_workload

    if hooks not in ("lean", "accelerate"):
        raise InvalidArgumentError(
            f'load_safely got hooks={hooks!r}. Pass hooks="lean" (omnifix\'s light hooks for '
            'a split model, the default) or hooks="accelerate" (keep accelerate\'s).'
        )
    kwargs = dict(from_pretrained_kwargs)
    if kwargs.pop("output_loading_info", False):
        raise InvalidArgumentError(
            "output_loading_info=True makes from_pretrained return a tuple, and load_safely "
            "returns the model. Drop it: missing or unexpected keys are still logged by "
            "transformers, and weights left without data are refused by assert_no_meta."
        )
    require_workload(workload)
    # 1. dtype: ours, or the caller's torch_dtype= (the pre-4.56 spelling) when ours is "auto".
    alias = kwargs.pop("torch_dtype", None)
    if alias is not None:
        if not (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
            raise InvalidArgumentError(
                f"Both dtype={dtype!r} and torch_dtype={alias!r} were given. Pass one: dtype= "
                "(load_safely passes it under the name the installed transformers expects)."
            )
        dtype = alias
    user_map = kwargs.pop("device_map", None)

    # 2. What to load: config (not the weights) and class.
    config, concrete = _config_and_class(pretrained, kwargs, model_class)

    # 3. Where: an explicit caller's map, or a plan over the measured budgets.
    plan: PlacementPlan | None = None
    if user_map is not None:
        device_map = _explicit_map(
            user_map, allow_offload=allow_offload, device=device, max_memory=max_memory
        )
        from omnifix._devices import normalize_device

        used = {normalize_device(value) for value in device_map.values() if value != "disk"}
        capabilities = gpu_capabilities(used)
    else:
        targets = _targets(device)
        capabilities = gpu_capabilities(targets)
    chosen_dtype = choose_dtype(dtype, capabilities=capabilities)
    attention, planned_attention = _attention_for(
        attn_implementation,
        config=config,
        dtype=chosen_dtype,
        capabilities=capabilities,
        model_class=concrete,
        strict=strict,
    )
    if user_map is None:
        plan = plan_placement(
            config,
            model_class=concrete,
            budgets=_budgets(device, targets, max_memory, allow_offload=allow_offload),
            dtype=chosen_dtype,
            attn_implementation=planned_attention,
            workload=workload,
            allow_offload=allow_offload,
        ).raise_if_refused()  # InsufficientMemoryError: need vs free per device, and options
        device_map = dict(plan.device_map)

    # 4. Load, with the dtype under the keyword this transformers expects.
    folder = _offload_folder(device_map, kwargs) if allow_offload else None
    kwargs[dtype_keyword()] = chosen_dtype
    kwargs["attn_implementation"] = attention
    model: Any = None
    try:
        model = concrete.from_pretrained(pretrained, device_map=device_map, **kwargs)
        # 5. Check: no weights left on meta (offloaded ones only when allowed).
        assert_no_meta(model, allow_offloaded=allow_offload)
    except BaseException as error:
        model = None
        translated = _load_error(error, pretrained, kwargs)
        _release(error)
        if folder is not None:
            _remove_folder(folder)
        if translated is None:
            raise
        raise translated from error
    if folder is not None:
        weakref.finalize(model, _remove_folder, folder)
    model.eval()

    # 6. A model that spans several devices: lean hooks, pinned embeddings; remember the plan.
    pinned = _hook_split(model, device_map, hooks)
    _RECORDS[model] = _record(plan, device_map, chosen_dtype, pinned)
    return model


def _hook_split(model: nn.Module, device_map: Mapping[str, object], hooks: str) -> tuple[str, ...]:
    """Hooks and pins for a model on several devices; returns the pinned embeddings' names.

    Lean hooks unless ``hooks="accelerate"`` or the map offloads (offloaded weights need
    accelerate's weight streaming), then the input embeddings pinned.
    """
    import warnings

    from omnifix._dispatch import lean_dispatch
    from omnifix._embeddings import pin_embeddings
    from omnifix.errors import OmnifixWarning

    if len(_execution_devices(model)) <= 1:
        return ()
    if hooks == "lean" and not offloads(
        {str(value).strip().lower() for value in device_map.values()}
    ):
        try:
            lean_dispatch(model)
        # lean_dispatch checks everything before it changes anything: a refusal leaves
        # accelerate's hooks in place, which work, only slower. Say so rather than fail the load.
        except OmnifixError as error:
            warnings.warn(
                f"load_safely kept accelerate's hooks on this split model: {error} To silence "
                'this, pass hooks="accelerate".',
                OmnifixWarning,
                stacklevel=3,
            )
    try:
        return pin_embeddings(model).modules
    except UnsupportedModelError:  # no token embedding (an audio-only model): nothing to pin
        return ()


def _remove_folder(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _record(
    plan: PlacementPlan | None,
    device_map: Mapping[str, object],
    dtype: torch.dtype,
    pinned: tuple[str, ...],
) -> _LoadRecord:
    from omnifix._plan.budgets import UNLIMITED

    if plan is None:
        places = sorted({str(value) for value in device_map.values()})
        return _LoadRecord(
            strategy="explicit",
            reason=f"the caller's device_map over {', '.join(places)}",
            dtype=dtype,
            predicted={},
            pinned=pinned,
        )
    return _LoadRecord(
        strategy=plan.strategy,
        reason=plan.reason,
        dtype=dtype,
        predicted={
            _device_key(row.device): (row.total, None if row.budget >= UNLIMITED else row.budget)
            for row in plan.devices
            if row.device in plan.devices_used
        },
        pinned=pinned,
    )
