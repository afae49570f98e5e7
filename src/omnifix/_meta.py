"""Meta tensors: finding parameters that are offloaded or were never loaded, and refusing them.

A tensor on ``meta`` has a shape but no data. It is *offloaded* when accelerate keeps the data on
cpu or disk and an ``AlignDevicesHook`` copies it in for each ``forward`` (code that reads it
outside ``forward`` fails: ``.item()``, ``.cpu()``, ``model.device``), and *uninitialised* when
there is no data anywhere (even ``forward`` fails). omnifix tells them apart from accelerate's
real state, never from names; docs/meta-tensors.md says what each transformers release does with
keys missing from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from omnifix._compat import deprecated
from omnifix._device_map import OFFLOAD_TARGETS, Placement, locate
from omnifix._modules import iter_hooks
from omnifix._table import Table, plain, rich
from omnifix._units import format_bytes
from omnifix.errors import MetaTensorError, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from rich.console import Group
    from torch import nn

    from omnifix._types import OffloadLocation

__all__ = ["MetaReport", "MetaTensor", "assert_no_meta", "find_meta_tensors"]

#: How many tensors an error message lists by name.
_SHOWN_IN_ERROR = 5
#: How many offloaded ``hf_device_map`` entries an error message lists.
_ENTRIES_IN_ERROR = 8
#: How many rows ``str(report)`` prints.
_SHOWN_IN_TABLE = 10


@dataclass(frozen=True)
class MetaTensor:
    """One parameter or buffer found on ``meta``.

    Attributes:
        name: Qualified name, as in ``model.named_parameters()`` (the first name of a tied weight).
        kind: ``"offloaded"`` (accelerate holds the data and loads it for ``forward``) or
            ``"uninitialised"`` (no data anywhere).
        shape: Shape of the tensor.
        dtype: Dtype of the tensor.
        nbytes: Size of its data once materialised.
        is_buffer: Whether it is a buffer rather than a parameter.
        offloaded_to: Where accelerate keeps an offloaded tensor (``"cpu"`` or ``"disk"``);
            ``None`` for uninitialised ones, or when an unknown kind of weights map hides it.
    """

    name: str
    kind: Literal["offloaded", "uninitialised"]
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_buffer: bool
    offloaded_to: OffloadLocation | None

    @property
    def module_name(self) -> str:
        """Qualified name of the module that owns the tensor (``""`` for the root)."""
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class MetaReport:
    """Every meta tensor of a model (see :func:`omnifix.find_meta_tensors`).

    A report is truthy when the model has meta tensors. ``str(report)`` is a short table.

    Attributes:
        tensors: The meta tensors, in ``named_modules`` order, each tied weight once.
        offloaded_device_map: The ``hf_device_map`` entries whose weights accelerate offloads,
            by ``dispatch_model``'s rule: every ``"disk"`` entry, and the ``"cpu"`` entries when
            the map's main device is an accelerator other than mps.
    """

    tensors: tuple[MetaTensor, ...]
    offloaded_device_map: dict[str, str]

    @property
    def offloaded(self) -> tuple[MetaTensor, ...]:
        """The tensors accelerate keeps on cpu or disk and loads only inside ``forward``."""
        return tuple(tensor for tensor in self.tensors if tensor.kind == "offloaded")

    @property
    def uninitialised(self) -> tuple[MetaTensor, ...]:
        """The tensors that have no data anywhere."""
        return tuple(tensor for tensor in self.tensors if tensor.kind == "uninitialised")

    @property
    def total_bytes(self) -> int:
        """Bytes all meta tensors would take once materialised."""
        return sum(tensor.nbytes for tensor in self.tensors)

    def __bool__(self) -> bool:
        """Whether the model has any tensor on ``meta``."""
        return bool(self.tensors)

    def __str__(self) -> str:
        """A short table: a summary line, then one row per tensor (the first few)."""
        return plain(self._blocks())

    def __rich__(self) -> Group:
        """The same as :meth:`__str__`, as a rich table."""
        return rich(self._blocks())

    def _blocks(self) -> list[str | Table]:
        if not self.tensors:
            return ["no meta tensors"]
        return [_summary(self.tensors), _table(self.tensors, _SHOWN_IN_TABLE)]


def find_meta_tensors(model: nn.Module) -> MetaReport:
    """Every parameter and buffer of ``model`` on ``meta``, classified.

    A meta tensor is *offloaded* when an accelerate ``AlignDevicesHook`` with ``offload=True`` on
    its module (or on an ancestor that places its submodules) has the tensor's key in its weights
    map, so the hook really loads it for ``forward`` (buffers count only if the hook offloads
    buffers and the buffer is persistent, as in accelerate's ``pre_forward``). Everything else on
    ``meta`` is *uninitialised*. Where an offloaded tensor lives comes from the weights map
    (accelerate's ``OffloadedWeightsLoader`` keeps cpu tensors in its ``state_dict`` and disk ones
    in its ``index``); ``hf_device_map`` is only the fallback for weights maps of unknown types.

    Args:
        model: Any module; a ``from_pretrained`` model, a skeleton, a submodule.

    Returns:
        The report; empty (and falsy) when nothing is on ``meta``. Building it never loads
        offloaded data from accelerate's own weights maps.

    Example:
        >>> import torch, omnifix
        >>> from accelerate import cpu_offload
        >>> model = cpu_offload(torch.nn.Sequential(torch.nn.Linear(4, 2)), execution_device="cpu")
        >>> report = omnifix.find_meta_tensors(model)
        >>> [(t.name, t.kind, t.offloaded_to, t.nbytes) for t in report.tensors]
        [('0.weight', 'offloaded', 'cpu', 32), ('0.bias', 'offloaded', 'cpu', 8)]
        >>> with torch.device("meta"):
        ...     skeleton = torch.nn.Linear(4, 2)
        >>> [t.kind for t in omnifix.find_meta_tensors(skeleton).uninitialised]
        ['uninitialised', 'uninitialised']
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"find_meta_tensors needs a torch.nn.Module, got {type(model).__name__}; pass the "
            "model itself (e.g. the result of from_pretrained)."
        )
    recorded = getattr(model, "hf_device_map", None)
    device_map: Mapping[str, object] = recorded if isinstance(recorded, Mapping) else {}
    found: dict[int, MetaTensor] = {}
    # Hooks that place their submodules (``preload_module_classes``, ``cpu_offload`` of a leaf
    # class) load tensors of descendants too; named_modules is pre-order, so ancestors come first.
    placing: dict[str, list[Any]] = {}
    for module_name, module in model.named_modules():
        # ``module.__dict__`` rather than getattr: nn.Module.__getattr__ raises (slowly) for the
        # thousands of modules without a hook, and add_hook_to_module stores it in __dict__.
        hooks = _offload_hooks(module) if "_hf_hook" in module.__dict__ else []
        if any(getattr(hook, "place_submodules", False) for hook in hooks):
            placing[module_name] = [h for h in hooks if getattr(h, "place_submodules", False)]
        for local, tensor, is_buffer in _own_tensors(module):
            if not tensor.is_meta:
                continue
            persistent = not is_buffer or local not in module._non_persistent_buffers_set  # noqa: SLF001
            location, offloaded = _find_offload(
                hooks, placing, module_name, local, is_buffer=is_buffer, persistent=persistent
            )
            if offloaded and location is None:
                location = _device_map_location(device_map, _join(module_name, local))
            previous = found.get(id(tensor))
            if previous is not None and (previous.kind == "offloaded" or not offloaded):
                continue  # a tied weight seen again; keep its first name unless this one has data
            found[id(tensor)] = MetaTensor(
                name=previous.name if previous is not None else _join(module_name, local),
                kind="offloaded" if offloaded else "uninitialised",
                shape=tuple(tensor.shape),
                dtype=tensor.dtype,
                nbytes=tensor.numel() * tensor.element_size(),
                is_buffer=is_buffer,
                offloaded_to=location if offloaded else None,
            )
    offloaded_map = dict(Placement.of(device_map).offloaded) if device_map else {}
    return MetaReport(tensors=tuple(found.values()), offloaded_device_map=offloaded_map)


def assert_no_meta(
    model: nn.Module, *, allow_offload: bool = False, allow_offloaded: bool | None = None
) -> None:
    """Raise :class:`omnifix.MetaTensorError` if ``model`` has tensors on ``meta``.

    Call it right after loading, before code that reads weights outside ``forward`` (``.item()``,
    ``model.device``, generation helpers), so that the failure names the tensors and the fix
    instead of surfacing later as ``Cannot copy out of meta tensor``.

    Args:
        model: The model to check.
        allow_offload: Accept tensors that accelerate offloads to cpu or disk (they work
            inside ``forward``). Uninitialised tensors raise regardless.
        allow_offloaded: Deprecated spelling of ``allow_offload``.

    Raises:
        MetaTensorError: Listing the first tensors, the counts per kind, their total size, the
            offloaded ``hf_device_map`` entries, and the fix for the case at hand; ``.report``
            is the :class:`omnifix.MetaReport`.
        UnsupportedModelError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, omnifix
        >>> omnifix.assert_no_meta(torch.nn.Linear(4, 2))  # real weights: passes
        >>> with torch.device("meta"):
        ...     skeleton = torch.nn.Linear(4, 2)
        >>> try:
        ...     omnifix.assert_no_meta(skeleton, allow_offload=True)
        ... except omnifix.MetaTensorError as error:
        ...     print(str(error).splitlines()[0])
        2 tensors are on the meta device (40 B): 2 uninitialised (no data anywhere).
    """
    if allow_offloaded is not None:
        deprecated("assert_no_meta(allow_offloaded=...)", "allow_offload=...")
        allow_offload = allow_offloaded
    report = find_meta_tensors(model)
    blocking = report.uninitialised if allow_offload else report.tensors
    if blocking:
        message = _message(report, blocking, allow_offload=allow_offload)
        raise MetaTensorError(message, report=report)


def _own_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    # The module's own registries, as named_parameters/named_buffers(recurse=False) read them,
    # without the generator machinery (this runs once per module of a 10B model).
    for local, param in module._parameters.items():  # noqa: SLF001
        if param is not None:
            yield local, param, False
    for local, buffer in module._buffers.items():  # noqa: SLF001
        if buffer is not None:
            yield local, buffer, True


def _offload_hooks(module: nn.Module) -> list[Any]:
    return [hook for hook in iter_hooks(module) if getattr(hook, "offload", False)]


def _find_offload(
    hooks: list[Any],
    placing: dict[str, list[Any]],
    module_name: str,
    local: str,
    *,
    is_buffer: bool,
    persistent: bool,
) -> tuple[OffloadLocation | None, bool]:
    """Whether an offload hook really loads this tensor for forward, and from where."""
    # accelerate's pre_forward loads named_module_tensors(include_buffers=offload_buffers,
    # remove_non_persistent=True): buffers only when the hook offloads buffers, never
    # non-persistent ones.
    if is_buffer and not persistent:
        return None, False
    for hook in hooks:
        if is_buffer and not getattr(hook, "offload_buffers", False):
            continue
        found, location = _lookup(getattr(hook, "weights_map", None), local)
        if found:
            return location, True
    if placing:
        parts = module_name.split(".") if module_name else []
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = ".".join(parts[:depth])
            for hook in placing.get(ancestor, ()):
                if is_buffer and not getattr(hook, "offload_buffers", False):
                    continue
                key = _join(".".join(parts[depth:]), local)
                found, location = _lookup(getattr(hook, "weights_map", None), key)
                if found:
                    return location, True
    return None, False


def _lookup(weights_map: object, key: str) -> tuple[bool, OffloadLocation | None]:
    """Whether ``weights_map`` holds ``key`` (without loading it), and where.

    We unwrap accelerate's ``PrefixedDataset`` and read ``OffloadedWeightsLoader``'s
    ``state_dict``/``index`` ourselves because ``key in weights_map`` goes through
    ``Mapping.__contains__`` -> ``__getitem__``, which reads disk-offloaded tensors from disk.
    """
    import torch

    while True:
        dataset = getattr(weights_map, "dataset", None)
        prefix = getattr(weights_map, "prefix", None)
        if dataset is None or not isinstance(prefix, str):
            break
        weights_map, key = dataset, prefix + key
    state_dict = getattr(weights_map, "state_dict", None)
    index = getattr(weights_map, "index", None)
    if isinstance(state_dict, Mapping) and isinstance(index, Mapping):  # OffloadedWeightsLoader
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not value.is_meta:
            return True, "cpu"
        return (True, "disk") if key in index else (False, None)
    if isinstance(weights_map, dict):  # init_hook's own copy, cpu_offload's state dict
        value = weights_map.get(key)
        if isinstance(value, torch.Tensor):
            return (False, None) if value.is_meta else (True, "cpu")
        return value is not None, None
    if isinstance(weights_map, Mapping):
        # Unknown mapping: membership may load the tensor, but it is the only truthful check.
        return key in weights_map, None
    return False, None


def _device_map_location(device_map: Mapping[str, object], name: str) -> OffloadLocation | None:
    """The ``"cpu"``/``"disk"`` value of the ``hf_device_map`` entry covering ``name``."""
    found = locate(device_map, name)
    value = None if found is None else found[1]
    return value if value in OFFLOAD_TARGETS else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _summary(tensors: tuple[MetaTensor, ...]) -> str:
    total = sum(tensor.nbytes for tensor in tensors)
    offloaded = [tensor for tensor in tensors if tensor.kind == "offloaded"]
    parts = []
    if offloaded:
        places = sorted({tensor.offloaded_to or "unknown place" for tensor in offloaded})
        parts.append(f"{len(offloaded)} offloaded by accelerate (to {' and '.join(places)})")
    if len(offloaded) < len(tensors):
        parts.append(f"{len(tensors) - len(offloaded)} uninitialised (no data anywhere)")
    noun = "tensor is" if len(tensors) == 1 else "tensors are"
    return f"{len(tensors)} {noun} on the meta device ({format_bytes(total)}): {', '.join(parts)}."


def _table(tensors: tuple[MetaTensor, ...], limit: int) -> Table:
    # Uninitialised tensors first: they break even forward().
    ordered = sorted(tensors, key=lambda tensor: tensor.kind != "uninitialised")
    rows = tuple(
        (
            tensor.name,
            "buffer" if tensor.is_buffer else "param",
            str(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            f"offloaded to {tensor.offloaded_to}" if tensor.offloaded_to else tensor.kind,
        )
        for tensor in ordered[:limit]
    )
    more = len(tensors) - limit
    if more > 0:
        rows += ((f"... and {more} more", "", "", "", ""),)
    return Table(("tensor", "kind", "shape", "dtype", "where"), rows)


def _message(report: MetaReport, blocking: tuple[MetaTensor, ...], *, allow_offload: bool) -> str:
    lines = [_summary(blocking), *_table(blocking, _SHOWN_IN_ERROR).lines()]
    if allow_offload and report.offloaded:
        lines.append(f"({len(report.offloaded)} offloaded tensors were allowed.)")
    has_offloaded = any(tensor.kind == "offloaded" for tensor in blocking)
    has_uninitialised = any(tensor.kind == "uninitialised" for tensor in blocking)
    if report.offloaded_device_map:
        items = list(report.offloaded_device_map.items())
        entries = ", ".join(f"{name}: {value}" for name, value in items[:_ENTRIES_IN_ERROR])
        more = (
            f" and {len(items) - _ENTRIES_IN_ERROR} more" if len(items) > _ENTRIES_IN_ERROR else ""
        )
        lines.append(f"Offloaded hf_device_map entries: {entries}{more}.")
    if has_offloaded:
        lines.append(
            "Offloaded tensors hold data only inside forward(); reading them outside it (.item(), "
            ".tolist(), .cpu(), model.device) fails with 'Cannot copy out of meta tensor'."
        )
    if has_uninitialised:
        lines.append(
            "Uninitialised tensors have no data anywhere (not even accelerate's offload maps), "
            "so even forward() fails on them."
        )
    fixes = []
    if has_uninitialised:
        fixes.append(
            "load the weights they need: check that the checkpoint has these keys "
            "(from_pretrained(..., output_loading_info=True) lists missing_keys) and matches the "
            "model class and config; a model built under accelerate's init_empty_weights() needs "
            "its weights loaded (from_pretrained or load_checkpoint_and_dispatch) before use"
        )
    if has_offloaded:
        fixes.append(
            "give the model room so nothing is offloaded: put it on one GPU with "
            'device_map="cuda", or spread it over several GPUs with an explicit device_map whose '
            'values are GPU indices only (no "cpu" or "disk"); load it in bfloat16 '
            "(torch_dtype=torch.bfloat16, dtype= on transformers 5) with "
            'attn_implementation="flash_attention_2" so it fits; or, if only forward() reads these '
            "weights, pass allow_offload=True knowingly"
        )
    lines.append("Fix: " + "; and ".join(fixes) + ".")
    return "\n".join(lines)
