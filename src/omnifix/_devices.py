"""Devices: turning what users write into real devices, and the device_map/input-device seam.

Three questions that downstream code keeps answering wrongly:

* *Which device did the user mean?* :func:`normalize_device` turns ``"auto"``, ``"gpu"``,
  ``"rocm"``, ``1`` or ``"cuda"`` into the real, indexed :class:`torch.device` of this machine,
  and refuses spellings torch would reject later with an unhelpful message.
* *What goes into* ``from_pretrained(device_map=...)`` *and where do inputs go?* These are two
  different answers, and :func:`resolve_device_map` returns both (see the Xinference example
  there).
* *Where does this loaded model want its* ``input_ids``? :func:`input_device` answers from the
  input embedding's execution device; ``model.device`` answers with the first parameter's
  device, which is ``meta`` for an offloaded first module and a wrong GPU for split models.

Every availability probe lives in one small private function per backend and calls torch's own
probe (``torch.cuda.is_available``, ``torch.backends.mps.is_available``, ...), so tests simulate
machines by patching torch, not us.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, SupportsIndex, cast

from omnifix.errors import (
    DeviceError,
    DeviceUnavailableError,
    MetaTensorError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from collections.abc import Collection

    import torch
    from torch import nn

    from omnifix._types import DeviceLike, DeviceMapValue, DeviceRequest

__all__ = [
    "ResolvedDevice",
    "available_devices",
    "cuda_device_count",
    "input_device",
    "normalize_device",
    "parse_device",
    "resolve_device_map",
]

# The words users write for devices; the base of "did you mean" suggestions.
_DEVICE_WORDS = ("auto", "cpu", "cuda", "gpu", "mps", "xpu", "npu", "rocm", "hip")
# Words that accelerate/transformers understand as whole-model device_map strategies.
_STRATEGIES = ("balanced", "balanced_low_0", "sequential")
# Offload targets: legal as device_map values, never as the device of a tensor you compute with.
_OFFLOAD_WORDS = ("cpu", "disk")
_MAX_LISTED = 8

_INDEX = re.compile(r"[0-9]+", re.ASCII)
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)
_SEVERAL_GPUS = 2
_GLUED_INDEX = re.compile(r"([a-z_]+?)[-_ ]?([0-9]+)", re.ASCII)


class ResolvedDevice(NamedTuple):
    """What to pass as ``device_map`` and where inputs go, for one device request.

    Unpacks like a pair: ``device_map, input_device = resolve_device_map("cuda")``.

    Attributes:
        device_map: The value for ``from_pretrained(device_map=...)``: a strategy word such as
            ``"auto"`` or an explicit ``{module_name: device}`` dict.
        input_device: Where to put ``input_ids`` and other inputs, when it is known before
            loading; ``None`` when only the loaded model can tell (then call
            :func:`omnifix.input_device` on it). Never ``"auto"``, never ``meta``.
    """

    device_map: DeviceMapValue
    input_device: torch.device | None


# --------------------------------------------------------------------------------------------
# Availability probes: one per backend, each a thin call of torch's own probe.
# --------------------------------------------------------------------------------------------


def cuda_device_count() -> int:
    import torch

    # is_available() first: device_count() can report devices that a broken driver cannot
    # open, and is_available() is what the rest of the ecosystem trusts.
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _cuda_current() -> int:
    import torch

    return int(torch.cuda.current_device())


def _is_rocm() -> bool:
    import torch

    return getattr(torch.version, "hip", None) is not None


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _xpu_module() -> Any | None:
    import torch

    xpu = getattr(torch, "xpu", None)  # absent before torch 2.4 and in some custom builds
    return xpu if xpu is not None and xpu.is_available() else None


def _npu_installed() -> bool:
    if "torch_npu" in sys.modules:
        # None there means "import blocked" (Python's convention): treat it as not installed.
        return sys.modules["torch_npu"] is not None
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):  # a broken or spec-less half-import: not usable
        return False


def _npu_module() -> Any | None:
    if not _npu_installed():
        return None
    import torch

    # Importing torch_npu is what registers the "npu" device type and torch.npu.
    import torch_npu  # noqa: F401

    npu = getattr(torch, "npu", None)
    return npu if npu is not None and npu.is_available() else None


def _other_accelerator(kind: str) -> tuple[int, int] | None:
    """``(device_count, current_index)`` of an out-of-tree accelerator type such as ``hpu``."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is None:
        return None
    try:
        current = accelerator.current_accelerator() if accelerator.is_available() else None
    # A backend registered without its torch module makes torch.accelerator raise; that
    # backend is then unusable, which is what "not available" means here.
    except RuntimeError:
        return None
    if current is None or current.type != kind:
        return None
    index_of = getattr(accelerator, "current_device_index", None) or getattr(
        accelerator, "current_device_idx", None
    )
    return int(accelerator.device_count()), (int(index_of()) if callable(index_of) else 0)


def _count_and_current(kind: str) -> tuple[int, int]:
    """How many ``kind`` devices this process sees, and the index of the current one."""
    if kind == "cuda":
        count = cuda_device_count()
        return count, (_cuda_current() if count else 0)
    if kind == "mps":
        return (1 if _mps_available() else 0), 0
    if kind in ("xpu", "npu"):
        module = _xpu_module() if kind == "xpu" else _npu_module()
        if module is None:
            return 0, 0
        count = int(module.device_count())
        return count, (int(module.current_device()) if count else 0)
    return _other_accelerator(kind) or (0, 0)


def available_devices() -> list[str]:
    """Every device this process can use, best first, as the strings users would write."""
    names: list[str] = []
    for kind in ("cuda", "xpu", "mps", "npu"):
        count, _ = _count_and_current(kind)
        if kind == "mps":
            names += ["mps"] if count else []
            continue
        names += [f"{kind}:{index}" for index in range(min(count, _MAX_LISTED))]
        if count > _MAX_LISTED:
            names.append(f"... {kind}:{count - 1}")
    return [*names, "cpu"]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _suggestion(text: str) -> str | None:
    """The closest valid spelling of ``text``, or ``None``."""
    kind, colon, rest = text.partition(":")
    index = rest if colon and _INDEX.fullmatch(rest) else None
    glued = None if colon else _GLUED_INDEX.fullmatch(text)
    if glued is not None:  # "cuda0", "gpu_1", "cdua0"
        kind, index = glued.group(1), glued.group(2)
    if kind not in _DEVICE_WORDS:
        close = difflib.get_close_matches(kind, _DEVICE_WORDS, n=1)
        if not close:
            return None
        kind = close[0]
    if kind == "auto":
        return "auto"
    return f"{kind}:{index}" if index is not None else kind


def _malformed(device: object, problem: str) -> DeviceError:
    text = str(device).strip().lower()
    suggestion = _suggestion(text)
    fix = (
        f"Did you mean {suggestion!r}?"
        if suggestion is not None and suggestion != text
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
    """``(kind, index)`` from anything a user may call a device; kind may be an alias."""
    import operator

    import torch

    if device is None:
        return "auto", None
    if isinstance(device, torch.device):
        return device.type, device.index
    if isinstance(device, bool):
        raise DeviceError(
            f"{device!r} is not a device: booleans are not device indices. Pass a CUDA index "
            "such as 0, a device string such as 'cuda:0', or 'auto'."
        )
    if not isinstance(device, str) and hasattr(type(device), "__index__"):  # int, numpy ints
        try:
            index = operator.index(cast("SupportsIndex", device))
        except TypeError as error:  # e.g. a float tensor: it has __index__ but refuses it
            raise DeviceError(
                f"{device!r} is not a device: it is not a whole number. Pass a CUDA index such "
                "as 0, a device string such as 'cuda:0', or 'auto'."
            ) from error
        if index < 0:
            raise DeviceError(
                f"{device!r} is not a device: device indices are >= 0 (0 is the first GPU). "
                "Pass 0 or 'cuda:0' for the first GPU, or 'cpu'."
            )
        return "cuda", index
    if not isinstance(device, str):
        raise DeviceError(
            f"{device!r} of type {type(device).__name__} is not a device: expected a string, a "
            "CUDA index, a torch.device or None. Pass e.g. 'cuda:0', 0, torch.device('cpu') or "
            "'auto'."
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
    if kind in ("meta", "disk", *_STRATEGIES):
        raise _refuse_map_word(device, kind)
    if kind not in _DEVICE_WORDS and not _torch_knows(kind):
        glued = not colon and _GLUED_INDEX.fullmatch(kind)
        raise _malformed(
            device, "the index must follow a colon" if glued else "unknown device type"
        )
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
        # torch warns about deprecated types (mkldnn) while parsing; we only ask whether it can.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.device(kind)
    except RuntimeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _unavailable(device: object, what: str, fix: str) -> DeviceUnavailableError:
    available = ", ".join(available_devices())
    return DeviceUnavailableError(
        f"{device!r} is not available: {what}. This process can use: {available}. {fix}"
    )


def _indexed(device: object, kind: str, index: int | None) -> torch.device:
    import torch

    count, current = _count_and_current(kind)
    if count == 0:
        if kind == "cuda":
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None and not _is_rocm()
                else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise _unavailable(
                device, why, "Pass 'auto' to use the best device available, or one listed."
            )
        if kind == "npu" and not _npu_installed():
            raise _unavailable(
                device,
                "Ascend NPUs need the torch_npu package, which is not installed",
                "Install torch_npu, or pass 'auto' to use the best device available.",
            )
        raise _unavailable(
            device,
            f"torch sees no {kind} device",
            "Pass 'auto' to use the best device available, or one listed.",
        )
    if index is None:
        index = current
    if index >= count:
        seen = f"only {kind}:0" if count == 1 else f"{kind}:0 to {kind}:{count - 1}"
        raise _unavailable(
            device,
            f"this process sees {count} {kind} device{'s' if count > 1 else ''} ({seen}; "
            "CUDA_VISIBLE_DEVICES and its kin hide and renumber them)",
            f"Pass an index below {count}, or 'auto'.",
        )
    return torch.device(kind, index)


def _resolve(device: object, kind: str, index: int | None) -> torch.device:
    import torch

    if kind == "auto":
        return _best()
    if kind in ("meta", "disk"):  # a torch.device("meta") gets here; strings stop in _parse_text
        raise _refuse_map_word(device, kind)
    if kind in ("rocm", "hip"):
        if not _is_rocm():
            raise _unavailable(
                device,
                "this torch is not a ROCm build (torch.version.hip is None)",
                "Install a ROCm build of torch for AMD GPUs, or pass 'auto'.",
            )
        kind = "cuda"  # ROCm torch addresses AMD GPUs through the cuda device type
    if kind == "gpu":
        kind = "cuda"
    if kind == "cpu":
        if index not in (None, 0):
            raise _unavailable(
                device, "torch has one CPU device, 'cpu'", "Pass 'cpu' without an index."
            )
        return torch.device("cpu")
    if kind == "mps":
        # mps has one device; tensors on it report "mps:0", so we return that to compare equal.
        if index not in (None, 0):
            raise _unavailable(device, "Apple's mps backend has one device", "Pass 'mps'.")
        return _indexed(device, "mps", 0)
    return _indexed(device, kind, index)


def _best() -> torch.device:
    """The best device this process has: cuda (ROCm too) -> xpu -> mps -> npu -> cpu."""
    import torch

    for kind in ("cuda", "xpu", "mps", "npu"):
        count, current = _count_and_current(kind)
        if count:
            return torch.device(kind, current)
    return torch.device("cpu")


def normalize_device(device: DeviceLike = "auto") -> torch.device:
    """The real device a tensor can be moved to. Never ``auto``, ``meta`` or ``disk``.

    Accelerators come back with their index (``cuda:0``, ``mps:0``), so the result compares
    equal to ``tensor.device`` of a tensor living there.

    Args:
        device: What the user asked for:

            * ``"auto"`` or ``None``: the best accelerator of this process, in the order
              cuda (ROCm builds report as cuda), xpu, mps, npu (when ``torch_npu`` is
              installed), else ``cpu``.
            * ``"cuda"`` or ``"gpu"``: the current CUDA device, with its index.
            * an ``int``: that CUDA index.
            * ``"rocm"`` or ``"hip"``: the current GPU of a ROCm build of torch (cuda there).
            * ``"cuda:1"``, ``"xpu:0"``, ``"mps"``, ``"npu:2"``, ``"cpu"`` or a
              :class:`torch.device`: checked against the devices this process sees, so
              ``CUDA_VISIBLE_DEVICES`` is respected.

            Case and surrounding spaces are ignored.

    Returns:
        A :class:`torch.device` that ``torch.empty(0, device=...)`` accepts on this machine.

    Raises:
        DeviceUnavailableError: The device is well formed but this machine lacks it (``"cuda"``
            on a CPU-only box, ``"cuda:7"`` with 2 GPUs); the message lists what is available.
        DeviceError: The string is malformed (``"cuda0"``, ``"cuda:-1"``, ``"cdua"``; the
            message suggests the closest valid spelling), or it names ``"meta"``, ``"disk"``
            or a device_map strategy, which are not devices.

    Example:
        >>> import omnifix
        >>> omnifix.normalize_device("cpu")
        device(type='cpu')
        >>> omnifix.normalize_device(" CPU:0 ")
        device(type='cpu')
        >>> omnifix.normalize_device().type in {"cuda", "xpu", "mps", "npu", "cpu"}
        True
        >>> try:
        ...     omnifix.normalize_device("cuda0")
        ... except omnifix.DeviceError as error:
        ...     print(str(error).rsplit(". ", 1)[-1])
        Did you mean 'cuda:0'?
    """
    return _resolve(device, *parse_device(device))


# --------------------------------------------------------------------------------------------
# device_map
# --------------------------------------------------------------------------------------------


def _map_entry(device: torch.device) -> str:
    """How a device is written in a device_map: accelerate compares ``"cpu"``/``"mps"`` bare."""
    return device.type if device.type in ("cpu", "mps") else str(device)


def _normalize_map_value(module_name: str, value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _OFFLOAD_WORDS:
        return value.strip().lower()
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        raise DeviceError(
            f"device_map[{module_name!r}] = {value!r} is not a placement: 'auto' (or None) "
            "chooses devices for a whole model, not for one module. Give that module a real "
            "device such as 'cuda:0', 0, 'cpu' or 'disk', or pass device_map='auto' on its own."
        )
    try:
        device = _resolve(value, *parse_device(value))
    except DeviceError as error:
        raise type(error)(f"device_map[{module_name!r}]: {error}") from error
    return _map_entry(device)


def device_order(name: str) -> tuple[int, str, int]:
    """Sort key of device names: accelerators by index, then the cpu, then the disk."""
    kind, _, index = name.partition(":")
    return ({"cpu": 1, "disk": 2}.get(kind, 0), kind, int(index) if index.isdigit() else -1)


def offloads(places: Collection[str]) -> bool:
    """Whether device_map values (``"cuda:0"``, ``0``, ``"cpu"``, ``"disk"``, as strings) offload.

    ``"disk"`` always does; ``"cpu"`` does next to any other device, since accelerate then runs
    the cpu entries on the main device and streams their weights in on every forward.
    """
    return "disk" in places or ("cpu" in places and len(places) > 1)


def _execution_devices(device_map: Mapping[str, str]) -> set[str]:
    """Where the modules of a normalized device_map execute, by accelerate's dispatch_model rule.

    accelerate runs modules mapped to "cpu" or "disk" on the *main* device: the first device of
    the map that is neither (the CPU when there is none). "cpu" there means "weights kept in
    RAM", not "computes on the CPU", whenever a GPU is in the map.
    """
    values = list(device_map.values())
    real = [value for value in values if value not in _OFFLOAD_WORDS]
    main = real[0] if real else "cpu"
    return {main if value in _OFFLOAD_WORDS else value for value in values}


def _resolve_plan(plan: Mapping[Any, Any]) -> ResolvedDevice:
    import torch

    if not plan:
        raise DeviceError(
            "device_map {} places no module anywhere. Pass {'': 'cuda:0'} to put the whole "
            "model on one device, or the strategy 'auto'."
        )
    normalized: dict[str, str] = {}
    for name, value in plan.items():
        if not isinstance(name, str):
            raise DeviceError(
                f"device_map key {name!r} is not a module name: keys are qualified module names "
                "such as 'model.layers.0', and '' means the whole model. Use string keys."
            )
        normalized[name] = _normalize_map_value(name, value)
    executing = _execution_devices(normalized)
    only = torch.device(executing.pop()) if len(executing) == 1 else None
    return ResolvedDevice(dict[str, int | str](normalized), only)


def resolve_device_map(device: DeviceRequest = "auto") -> ResolvedDevice:
    """Split a device request into a ``device_map`` value and the input device (if known yet).

    A device and a ``device_map`` are different things, and code that stores one where the other
    belongs breaks at the first request. Xinference's Qwen2-Audio loader (v1.2.2 to v1.6.0) is
    the example: on a GPU box it turned the device ``"cuda"`` into ``device_map="auto"`` so the
    model could spread over all GPUs, and stored that same ``"auto"`` as the device for inputs;
    every chat request then ran ``inputs.to("auto")``, which torch rejects with
    ``RuntimeError: Expected one of cpu, cuda, ... device type at start of device string: auto``.
    Here the two answers come back apart, and the input device is never a device_map word.

    Rules:

    * ``"auto"``, ``None``, ``"cuda"`` or ``"gpu"`` (``"rocm"``/``"hip"`` on ROCm) with two
      or more visible CUDA GPUs: ``("auto", None)``. Where the input embedding lands is only
      known after loading: call :func:`omnifix.input_device` on the loaded model.
    * Any other single device (cpu, mps, xpu, npu, ``"cuda:1"``, an index, the only GPU, or
      ``"auto"`` resolving to one device): ``({"": "<device>"}, <device>)``, checked by
      :func:`normalize_device`. The dict form is what every transformers from 4.45 on turns a
      device string into, so it loads the same way everywhere.
    * ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``: passed through, input unknown.
    * A ``{module_name: device}`` dict: passed through with each value normalized (``"cpu"``
      and ``"disk"`` stay, as offload targets; ``"cuda"`` and ``0`` become ``"cuda:0"``). The
      input device is known when every module executes on one device by accelerate's rule
      (modules mapped to ``"cpu"``/``"disk"`` execute on the map's first other device), else
      ``None``.

    Args:
        device: A device (anything :func:`normalize_device` takes), a strategy word, or an
            explicit device_map dict.

    Returns:
        ``ResolvedDevice(device_map, input_device)``; unpacks as a pair.

    Raises:
        DeviceUnavailableError: A named device is missing on this machine.
        DeviceError: A malformed device, ``"meta"``/``"disk"`` as the whole model's device, or a
            dict value that is not a placement (``"meta"``, ``"auto"``, ``None``).

    Example:
        >>> import omnifix
        >>> omnifix.resolve_device_map("cpu")
        ResolvedDevice(device_map={'': 'cpu'}, input_device=device(type='cpu'))
        >>> device_map, inputs_to = omnifix.resolve_device_map("balanced")
        >>> device_map, inputs_to
        ('balanced', None)
        >>> omnifix.resolve_device_map({"model.embed_tokens": "cpu", "lm_head": "disk"})
        ResolvedDevice(device_map={'model.embed_tokens': 'cpu', 'lm_head': 'disk'}, \
input_device=device(type='cpu'))
    """
    if isinstance(device, Mapping):
        return _resolve_plan(device)
    if device is None or isinstance(device, str):
        word = "auto" if device is None else device.strip().lower()
        if word in _STRATEGIES:
            return ResolvedDevice(cast("DeviceMapValue", word), None)
        spreads = ("auto", "cuda", "gpu", *(("rocm", "hip") if _is_rocm() else ()))
        if word in spreads and cuda_device_count() >= _SEVERAL_GPUS:
            return ResolvedDevice("auto", None)
    resolved = normalize_device(device)
    return ResolvedDevice({"": _map_entry(resolved)}, resolved)


# --------------------------------------------------------------------------------------------
# Input device of a loaded model
# --------------------------------------------------------------------------------------------


def _hf_map_device(model: nn.Module, name: str) -> torch.device | None:
    """Where ``name`` executes according to ``model.hf_device_map``, by accelerate's rule."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, Mapping) or not device_map:
        return None
    matches = [
        key
        for key in device_map
        if isinstance(key, str) and (key in ("", name) or name.startswith(key + "."))
    ]
    if not matches:
        return None
    entries = {key: _hf_entry(value) for key, value in device_map.items()}
    entry = entries[max(matches, key=len)]
    if entry in _OFFLOAD_WORDS:
        real = [value for value in entries.values() if value not in _OFFLOAD_WORDS]
        entry = real[0] if real else "cpu"
    return _device_or_none(entry)


def _hf_entry(value: object) -> str:
    """One hf_device_map value as a string; ints are accelerator indices (accelerate's reading)."""
    import torch

    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        kind = (
            "npu"
            if _npu_module()
            else "xpu"
            if not cuda_device_count() and _xpu_module()
            else "cuda"
        )
        return f"{kind}:{value}"
    return str(value)


def _device_or_none(text: str) -> torch.device | None:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        return None
    return None if device.type == "meta" else device


def _runs_on(model: nn.Module, name: str, module: nn.Module) -> torch.device | None:
    """Where ``module`` (called ``name`` inside ``model``) computes; ``None`` if nothing says."""
    from omnifix._modules import execution_device, hook_execution_device

    # 1. Its own accelerate hook, else its first real tensor.
    device = execution_device(module)
    if device is not None and device.type != "meta":
        return device
    # 2. The nearest ancestor's hook: accelerate hooks a whole block (place_submodules=True,
    #    e.g. preload_module_classes) and leaves the children's weights on meta until it runs.
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        device = hook_execution_device(ancestor)
        if device is not None and device.type != "meta":
            return device
    # 3. The plan transformers recorded when it dispatched the model.
    return _hf_map_device(model, name)


def _first_module_with_tensors(model: nn.Module) -> tuple[str, nn.Module] | None:
    for want_parameters in (True, False):
        for name, module in model.named_modules():
            tensors = (
                module.parameters(recurse=False)
                if want_parameters
                else module.buffers(recurse=False)
            )
            if next(iter(tensors), None) is not None:
                return name, module
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where callers should put ``input_ids``: the input embedding's execution device.

    Use it instead of ``model.device``, which is the device of the model's *first parameter*:
    ``meta`` when that parameter is offloaded to disk or to CPU behind an accelerate hook, and the
    wrong GPU when a multimodal model's vision or audio tower comes first and sits elsewhere.

    The answer is, in order: the execution device of the accelerate hook on the primary input
    embedding (the one that receives ``input_ids``; for Qwen2.5-Omni the thinker's); else the
    device of its weights; else the hook of the nearest enclosing module; else the model's
    ``hf_device_map`` (offloaded ``"cpu"``/``"disk"`` entries execute on the main device, as
    accelerate dispatches them). A model without a token embedding answers for its first
    module with parameters, by the same rules.

    Args:
        model: A loaded model (any :class:`torch.nn.Module`; typically a transformers model).

    Returns:
        A real :class:`torch.device`, never ``meta``.

    Raises:
        MetaTensorError: The weights are on ``meta`` and nothing says where the module runs:
            the model was built without loading weights (e.g. under
            ``accelerate.init_empty_weights()``).
        UnsupportedModelError: The model has no parameters or buffers at all.

    Example:
        >>> import omnifix
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> config = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...                      num_hidden_layers=1, num_attention_heads=2,
        ...                      num_key_value_heads=1)
        >>> omnifix.input_device(Qwen2ForCausalLM(config))
        device(type='cpu')
    """
    from omnifix._modules import find_input_embeddings

    embeddings = find_input_embeddings(model)
    module: nn.Module
    if embeddings:
        name, module = embeddings[0]
        what = f"input embedding {name!r}"
    else:
        found = _first_module_with_tensors(model)
        if found is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no parameters or buffers, so no module of it says "
                "where inputs go. Pass the model that owns the weights (the loaded "
                "PreTrainedModel, not a weightless wrapper)."
            )
        name, module = found
        what = f"first module with weights {name or '<root>'!r}"
    device = _runs_on(model, name, module)
    if device is None:
        raise MetaTensorError(
            f"The {what} of {type(model).__name__} has its weights on the meta device, and no "
            "accelerate hook or hf_device_map entry says where it runs: its weights were never "
            "loaded (the model was built under accelerate.init_empty_weights() or on the meta "
            "device). Load real weights first, with from_pretrained(..., device_map=...) or "
            "accelerate.load_checkpoint_and_dispatch(...), then ask again."
        )
    return device
