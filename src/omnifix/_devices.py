"""Devices: what users write, the machine's real devices (torch's probes), where inputs go."""

from __future__ import annotations

import difflib
import operator
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, SupportsIndex, cast

from omnifix._device_map import (
    OFFLOAD_TARGETS,
    STRATEGIES,
    Placement,
    current_accelerator,
    npu_installed,
    spell,
)
from omnifix._meta import find_meta_tensors
from omnifix._modules import (
    execution_device,
    find_input_embeddings,
    hook_execution_device,
    require_module,
)
from omnifix.errors import (
    DeviceError,
    DeviceUnavailableError,
    MetaTensorError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from omnifix._types import DeviceLike, DeviceMapValue, DeviceRequest

__all__ = [
    "ResolvedDevice",
    "available_devices",
    "cuda_device_count",
    "input_device",
    "normalize_device",
    "normalize_map",
    "parse_device",
    "resolve_device_map",
    "spreads",
]

#: The words users write for devices; the base of "did you mean" suggestions.
_DEVICE_WORDS: Final = ("auto", "cpu", "cuda", "gpu", "mps", "xpu", "npu", "rocm", "hip")
_MAX_LISTED: Final = 8
_INDEX: Final = re.compile(r"[0-9]+", re.ASCII)
_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)
_GLUED_INDEX: Final = re.compile(r"([a-z_]+?)[-_ ]?([0-9]+)", re.ASCII)
_ANY_DEVICE: Final = "Pass e.g. 'cuda:0', 0, torch.device('cpu') or 'auto'."


class ResolvedDevice(NamedTuple):
    """What to pass as ``device_map`` and where inputs go; unpacks like a pair.

    Attributes:
        device_map: The value for ``from_pretrained(device_map=...)``: a strategy word such as
            ``"auto"`` or an explicit ``{module_name: device}`` dict.
        input_device: Where to put ``input_ids``, when it is known before loading; ``None`` when
            only the loaded model can tell (then ask :func:`omnifix.input_device`).
    """

    device_map: DeviceMapValue
    input_device: torch.device | None


def cuda_device_count() -> int:
    """The CUDA (or ROCm) GPUs this process sees; 0 when torch says CUDA is not available."""
    cuda = _backend("cuda")
    return int(cuda.device_count()) if cuda is not None else 0


def _backend(kind: str) -> Any | None:
    """``torch.cuda``/``xpu``/``npu`` when it has devices (importing torch_npu registers npu)."""
    import torch

    if kind == "npu":
        if not npu_installed():
            return None
        import torch_npu  # noqa: F401
    module = getattr(torch, kind, None)
    # is_available() first: device_count() can count devices that a broken driver cannot open.
    return module if module is not None and module.is_available() else None


def _count_and_current(kind: str) -> tuple[int, int]:
    """How many ``kind`` devices this process sees, and the index of the current one."""
    import torch

    if kind == "mps":
        return int(torch.backends.mps.is_available()), 0
    if kind in ("cuda", "xpu", "npu"):
        module = _backend(kind)
        count = int(module.device_count()) if module is not None else 0
        return count, (int(module.current_device()) if module is not None and count else 0)
    current = current_accelerator()  # out-of-tree types such as hpu
    if current is None or current[0] != kind:
        return 0, 0
    return int(torch.accelerator.device_count()), current[1]


def available_devices() -> list[str]:
    """Every device this process can use, best first, as users write them (``"cuda:0"``)."""
    names: list[str] = []
    for kind in ("cuda", "xpu", "mps", "npu"):
        count, _ = _count_and_current(kind)
        shown = [f"{kind}:{index}" for index in range(min(count, _MAX_LISTED))]
        names += ["mps"] * count if kind == "mps" else shown  # mps: one device, written bare
        names += [f"... {kind}:{count - 1}"] if count > _MAX_LISTED else []
    return [*names, "cpu"]


def spreads(device: object) -> bool:
    """Whether ``device`` asks for every visible GPU: auto, None, cuda, gpu (rocm, hip on ROCm)."""
    import torch

    words = ("auto", "cuda", "gpu", *(("rocm", "hip") if torch.version.hip is not None else ()))
    return device is None or (isinstance(device, str) and device.strip().lower() in words)


def _malformed(device: str) -> DeviceError:
    """The error for a string that is no device, with its closest valid spelling if any."""
    text = device.strip().lower()
    kind, colon, rest = text.partition(":")
    index = rest if colon and _INDEX.fullmatch(rest) else None
    glued = None if colon else _GLUED_INDEX.fullmatch(text)
    problem = "unknown device type" if glued is None else "the index must follow a colon"
    if glued is not None:  # "cuda0", "gpu_1", "cdua0"
        kind, index = glued.group(1), glued.group(2)
    if kind not in _DEVICE_WORDS:
        close = difflib.get_close_matches(kind, _DEVICE_WORDS, n=1)
        kind = close[0] if close else ""  # "": nothing close enough to suggest
    suggestion = kind if kind in ("", "auto") or index is None else f"{kind}:{index}"
    fix = (
        f"Did you mean {suggestion!r}?"
        if suggestion and suggestion != text
        else "Write one of 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps', 'xpu', 'npu' or 'rocm'."
    )
    return DeviceError(f"{device!r} is not a device: {problem}. {fix}")


def _refuse_map_word(device: object, word: str) -> DeviceError:
    if word == "meta":
        return DeviceError(
            f"{device!r} is not a device you can compute on: 'meta' tensors have shapes but no "
            "data (accelerate and transformers use it for weights that are offloaded or not "
            "loaded yet), so inputs moved there are lost. Pass a real device such as 'cuda:0' "
            "or 'cpu', or 'auto' for the best one this machine has."
        )
    if word == "disk":
        return DeviceError(
            f"{device!r} is not a device: 'disk' is an offload target that only a device_map "
            "understands (e.g. {'model.layers.30': 'disk'} with offload_folder=...). Put it in a "
            "device_map dict for resolve_device_map()/from_pretrained(), and pass a real device "
            "such as 'cuda:0' or 'cpu' here."
        )
    return DeviceError(
        f"{device!r} is a device_map strategy for from_pretrained(), not a device: it spreads a "
        "model over devices, so no tensor can be moved to it. Use "
        f"omnifix.resolve_device_map({word!r}) to load with it and omnifix.input_device(model) "
        "for where the inputs go, or pass a real device such as 'cuda:0' here."
    )


def parse_device(device: object) -> tuple[str, int | None]:
    """``(kind, index)`` of what a user calls a device (kind may be an alias), machine unchecked."""
    import torch

    if device is None:
        return "auto", None
    if isinstance(device, torch.device):
        return device.type, device.index
    if isinstance(device, bool):
        raise DeviceError(f"{device!r} is not a device: booleans are not indices. {_ANY_DEVICE}")
    if not isinstance(device, str) and hasattr(type(device), "__index__"):  # int, numpy ints
        try:
            index = operator.index(cast("SupportsIndex", device))
        except TypeError as error:  # e.g. a float tensor: it has __index__ but refuses it
            raise DeviceError(f"{device!r} is not a whole number. {_ANY_DEVICE}") from error
        if index < 0:
            raise DeviceError(
                f"{device!r} is not a device: device indices are >= 0 (0 is the first GPU). "
                "Pass 0 or 'cuda:0' for the first GPU, or 'cpu'."
            )
        return "cuda", index
    if not isinstance(device, str):
        raise DeviceError(
            f"{device!r} of type {type(device).__name__} is not a device: expected a string, a "
            f"CUDA index, a torch.device or None. {_ANY_DEVICE}"
        )
    return _parse_text(device)


def _parse_text(device: str) -> tuple[str, int | None]:
    text = device.strip().lower()
    if not text:
        raise DeviceError(
            f"{device!r} is not a device: the string is empty. Pass 'auto' for the best available "
            "device, or e.g. 'cuda:0' or 'cpu'."
        )
    kind, colon, rest = text.partition(":")
    if kind in ("meta", "disk", *STRATEGIES[1:]):
        raise _refuse_map_word(device, kind)
    if kind not in _DEVICE_WORDS and not _torch_knows(kind):
        raise _malformed(device)
    if not colon:
        return kind, None
    if kind == "auto":
        raise DeviceError(
            f"{device!r} is not a device: 'auto' picks the device itself and takes no index. "
            "Pass 'auto', or a concrete device such as 'cuda:1'."
        )
    if re.fullmatch(r"\s*-\s*[0-9]+\s*", rest, re.ASCII):
        raise DeviceError(
            f"{device!r} is not a device: device indices are >= 0 ({kind}:0 is the first). "
            f"Pass {kind + ':0'!r}, or {kind!r} for the current one."
        )
    if not _INDEX.fullmatch(rest):
        raise DeviceError(
            f"{device!r} is not a device: what follows the colon must be a device index (a "
            f"whole number >= 0). Write e.g. {kind + ':0'!r}, or {kind!r} for the current one."
        )
    return kind, int(rest)


def _torch_knows(kind: str) -> bool:
    """Whether torch accepts ``kind`` as a device type (hpu, xla, privateuseone, ...)."""
    import torch

    if not _IDENTIFIER.fullmatch(kind):
        return False
    try:
        with warnings.catch_warnings():  # torch warns about deprecated types (mkldnn)
            warnings.simplefilter("ignore")
            torch.device(kind)
    except RuntimeError:
        return False
    return True


def _unavailable(device: object, what: str, fix: str) -> DeviceUnavailableError:
    available = tuple(available_devices())
    return DeviceUnavailableError(
        f"{device!r} is not available: {what}. This process can use: {', '.join(available)}. {fix}",
        requested=device,
        available=available,
    )


def _indexed(device: object, kind: str, index: int | None) -> torch.device:
    import torch

    count, current = _count_and_current(kind)
    if count == 0:
        why = f"torch sees no {kind} device"
        fix = "Pass 'auto' to use the best device available, or one listed."
        if kind == "cuda":
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None and torch.version.hip is None
                else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"
            )
        elif kind == "npu" and not npu_installed():
            why = "Ascend NPUs need the torch_npu package, which is not installed"
            fix = "Install torch_npu, or pass 'auto' to use the best device available."
        raise _unavailable(device, why, fix)
    index = current if index is None else index
    if index >= count:
        seen = f"only {kind}:0" if count == 1 else f"{kind}:0 to {kind}:{count - 1}"
        raise _unavailable(
            device,
            f"this process sees {count} {kind} device{'s' if count > 1 else ''} ({seen}; "
            "CUDA_VISIBLE_DEVICES and its kin hide and renumber them)",
            f"Pass an index below {count}, or 'auto'.",
        )
    return torch.device(kind, index)


def normalize_device(device: DeviceLike = "auto") -> torch.device:
    """The real device a tensor can be moved to. Never ``auto``, ``meta`` or ``disk``.

    Args:
        device: ``"auto"`` or ``None`` (torch's current accelerator with its current index, else
            ``cpu``); ``"cuda"`` or ``"gpu"`` (the current CUDA device); an ``int`` (that CUDA
            index); ``"rocm"``/``"hip"`` (the current GPU of a ROCm build); ``"cuda:1"``,
            ``"xpu:0"``, ``"mps"``, ``"npu:2"``, ``"cpu"`` or a :class:`torch.device`, checked
            against the devices this process sees (``CUDA_VISIBLE_DEVICES`` is respected). Case
            and surrounding spaces are ignored.

    Returns:
        A :class:`torch.device` that ``torch.empty(0, device=...)`` accepts on this machine,
        with its index (``cuda:0``, ``mps:0``) so that it equals ``tensor.device`` of tensors there.

    Raises:
        DeviceUnavailableError: The device is well formed but missing here (see ``.available``).
        DeviceError: A malformed string (the message suggests the closest spelling), or
            ``"meta"``, ``"disk"`` or a device_map strategy, which are not devices.

    Example:
        >>> import omnifix
        >>> omnifix.normalize_device(" CPU:0 ")
        device(type='cpu')
        >>> try:
        ...     omnifix.normalize_device("cuda0")
        ... except omnifix.DeviceError as error:
        ...     print(str(error).rsplit(". ", 1)[-1])
        Did you mean 'cuda:0'?
    """
    import torch

    kind, index = parse_device(device)
    if kind == "auto":
        best = current_accelerator()
        return torch.device(*best) if best is not None else torch.device("cpu")
    if kind in ("meta", "disk"):  # a torch.device("meta") gets here; strings stop at parsing
        raise _refuse_map_word(device, kind)
    if kind in ("rocm", "hip") and torch.version.hip is None:
        raise _unavailable(
            device,
            "this torch is not a ROCm build (torch.version.hip is None)",
            "Install a ROCm build of torch for AMD GPUs, or pass 'auto'.",
        )
    kind = "cuda" if kind in ("gpu", "rocm", "hip") else kind  # ROCm torch: AMD GPUs are cuda
    if kind in ("cpu", "mps") and index not in (None, 0):
        one = "torch has one CPU device" if kind == "cpu" else "Apple's mps backend has one device"
        raise _unavailable(device, one, f"Pass {kind!r} without an index.")
    if kind == "cpu":
        return torch.device("cpu")
    # mps tensors report "mps:0", so the result carries the index to compare equal to them.
    return _indexed(device, kind, 0 if kind == "mps" else index)


def normalize_map(device_map: Mapping[Any, object]) -> dict[str, str]:
    """An explicit device_map checked against this machine: values as :func:`spell`, or cpu/disk."""
    if not device_map:
        raise DeviceError(
            "device_map {} places no module anywhere. Pass {'': 'cuda:0'} to put the whole "
            "model on one device, or the strategy 'auto'."
        )
    normalized: dict[str, str] = {}
    for name, value in device_map.items():
        if not isinstance(name, str):
            raise DeviceError(
                f"device_map key {name!r} is not a module name: keys are qualified module names "
                "such as 'model.layers.0', and '' means the whole model. Use string keys."
            )
        word = value.strip().lower() if isinstance(value, str) else value
        if word is None or word == "auto":
            raise DeviceError(
                f"device_map[{name!r}] = {value!r} is not a placement: 'auto' (or None) "
                "chooses devices for a whole model, not for one module. Give that module a real "
                "device such as 'cuda:0', 0, 'cpu' or 'disk', or pass device_map='auto' on its own."
            )
        if word in OFFLOAD_TARGETS:
            normalized[name] = word
            continue
        try:
            normalized[name] = spell(normalize_device(cast("DeviceLike", value)))
        except DeviceUnavailableError as error:
            raise DeviceUnavailableError(
                f"device_map[{name!r}]: {error}",
                requested=error.requested,
                available=error.available,
            ) from error
        except DeviceError as error:
            raise DeviceError(f"device_map[{name!r}]: {error}") from error
    return normalized


def resolve_device_map(device: DeviceRequest = "auto") -> ResolvedDevice:
    """Split a device request into a ``device_map`` value and the input device (if known yet).

    The two come back apart, and the input device is never a map word (code that stored
    ``"auto"`` as one broke at ``inputs.to("auto")``).

    * ``"auto"``, ``None``, ``"cuda"`` or ``"gpu"`` (``"rocm"``/``"hip"`` on ROCm) with two or
      more visible CUDA GPUs: ``("auto", None)``; ask :func:`omnifix.input_device` after loading.
    * Any other single device: ``({"": "<device>"}, <device>)``, checked by
      :func:`normalize_device`; the dict form loads the same way on every transformers.
    * ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``: passed through, input unknown.
    * A ``{module_name: device}`` dict: each value checked by :func:`normalize_device` and
      spelled ``"cuda:0"`` (``"cpu"``/``"disk"`` stay, as offload targets); the input device is
      known when every module computes on one device (offloaded entries compute on the map's
      main device, as in accelerate).

    Args:
        device: A device, a strategy word, or an explicit device_map dict.

    Returns:
        ``ResolvedDevice(device_map, input_device)``.

    Raises:
        DeviceUnavailableError: A named device is missing on this machine.
        DeviceError: A malformed device, ``"meta"``/``"disk"`` as the whole model's device, or a
            dict value that is not a placement.

    Example:
        >>> import omnifix
        >>> omnifix.resolve_device_map("cpu")
        ResolvedDevice(device_map={'': 'cpu'}, input_device=device(type='cpu'))
        >>> omnifix.resolve_device_map("balanced")
        ResolvedDevice(device_map='balanced', input_device=None)
        >>> omnifix.resolve_device_map({"model.embed_tokens": "cpu", "lm_head": "disk"})
        ResolvedDevice(device_map={'model.embed_tokens': 'cpu', 'lm_head': 'disk'}, \
input_device=device(type='cpu'))
    """
    if isinstance(device, Mapping):
        normalized = normalize_map(device)
        executing = Placement.of(normalized).devices
        only = _device_or_none(executing[0]) if len(executing) == 1 else None
        return ResolvedDevice(dict[str, int | str](normalized), only)
    if isinstance(device, str) and device.strip().lower() in STRATEGIES[1:]:
        return ResolvedDevice(cast("DeviceMapValue", device.strip().lower()), None)
    if spreads(device) and cuda_device_count() > 1:
        return ResolvedDevice("auto", None)
    resolved = normalize_device(device)
    return ResolvedDevice({"": spell(resolved)}, resolved)


def _device_or_none(place: str | None) -> torch.device | None:
    """The device a map's place names, indexed as tensors report it (``mps:0``); not meta."""
    import torch

    try:
        device = torch.device(place) if place is not None else None
    except RuntimeError:
        return None
    if device is None or device.type == "meta":
        return None
    return torch.device("mps", 0) if device.type == "mps" else device


def _runs_on(model: nn.Module, name: str, module: nn.Module) -> torch.device | None:
    """Where ``module`` (called ``name`` inside ``model``) computes; ``None`` if nothing says."""
    # 1. Its own accelerate hook, else its first real tensor.
    device = execution_device(module)
    if device is not None and device.type != "meta":
        return device
    # 2. The nearest ancestor's hook: accelerate may hook a whole block (place_submodules=True)
    #    and leave the children's weights on meta until it runs.
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        device = hook_execution_device(model.get_submodule(".".join(parts[:depth])))
        if device is not None and device.type != "meta":
            return device
    # 3. The map transformers recorded when it dispatched the model, by accelerate's rule.
    recorded = getattr(model, "hf_device_map", None)
    if not isinstance(recorded, Mapping) or not recorded:
        return None
    return _device_or_none(Placement.of(recorded).runs_on(name))


def _first_module_with_tensors(model: nn.Module) -> tuple[str, nn.Module] | None:
    for want_parameters in (True, False):
        for name, module in model.named_modules():
            own = module.parameters(False) if want_parameters else module.buffers(False)  # noqa: FBT003
            if next(iter(own), None) is not None:
                return name, module
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where callers should put ``input_ids``: the input embedding's execution device.

    Not ``model.device`` (the first parameter's: ``meta`` when offloaded, or a vision tower's GPU),
    but the accelerate hook's execution device of the primary input embedding (Qwen2.5-Omni: the
    thinker's), else its weights' device, else the nearest enclosing module's hook, else
    ``hf_device_map`` by accelerate's rule; without a token embedding, its first module's.

    Args:
        model: A loaded model (any :class:`torch.nn.Module`).

    Returns:
        A real :class:`torch.device`, never ``meta``.

    Raises:
        MetaTensorError: The weights are on ``meta`` and nothing says where the module runs
            (never loaded); ``.report`` lists the meta tensors.
        UnsupportedModelError: ``model`` is not a module, or has no parameters or buffers.

    Example:
        >>> import omnifix
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> config = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> omnifix.input_device(Qwen2ForCausalLM(config))
        device(type='cpu')
    """
    require_module(model, "input_device")
    embeddings = find_input_embeddings(model)
    found = embeddings[0] if embeddings else _first_module_with_tensors(model)
    if found is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameters or buffers, so no module of it says where "
            "inputs go. Pass the model that owns the weights (the loaded PreTrainedModel, not a "
            "weightless wrapper)."
        )
    name, module = found
    what = "input embedding" if embeddings else "first module with weights"
    device = _runs_on(model, name, module)
    if device is None:
        raise MetaTensorError(
            f"The {what} {name or '<root>'!r} of {type(model).__name__} has its weights on the "
            "meta device, and no accelerate hook or hf_device_map entry says where it runs: its "
            "weights were never loaded (the model was built under accelerate.init_empty_weights() "
            "or on the meta device). Load real weights first, with from_pretrained(..., "
            "device_map=...) or accelerate.load_checkpoint_and_dispatch(...), then ask again.",
            report=find_meta_tensors(model),
        )
    return device
