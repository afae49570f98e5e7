"""Meta tensors: finding the offloaded and the never loaded ones, and refusing them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from omnifix._compat import deprecated
from omnifix._device_map import OFFLOAD_TARGETS, Placement, locate
from omnifix._modules import iter_hooks, require_module
from omnifix._table import Table, plain, rich
from omnifix._units import format_bytes
from omnifix.errors import MetaTensorError

if TYPE_CHECKING:
    import torch
    from rich.console import Group
    from torch import nn

    from omnifix._types import OffloadLocation

__all__ = ["MetaReport", "MetaTensor", "assert_no_meta", "find_meta_tensors"]

#: Tensors an error lists by name, offloaded hf_device_map entries it lists, rows of str(report).
_SHOWN_IN_ERROR, _ENTRIES_IN_ERROR, _SHOWN_IN_TABLE = 5, 8, 10
#: Why each kind fails, and its fix, in the order errors give them.
_WHY: Final = {
    "offloaded": "Offloaded tensors hold data only inside forward(); reading them outside it "
    "(.item(), .tolist(), .cpu(), model.device) fails with 'Cannot copy out of meta tensor'.",
    "uninitialised": "Uninitialised tensors have no data anywhere (not even accelerate's offload "
    "maps), so even forward() fails on them.",
}
_FIX: Final = {
    "uninitialised": "load the weights they need: check that the checkpoint has these keys "
    "(from_pretrained(..., output_loading_info=True) lists missing_keys) and matches the model "
    "class and config; a model built under accelerate's init_empty_weights() needs its weights "
    "loaded (from_pretrained or load_checkpoint_and_dispatch) before use",
    "offloaded": "give the model room so nothing is offloaded: put it on one GPU with "
    'device_map="cuda", or spread it over several GPUs with an explicit device_map whose values '
    'are GPU indices only (no "cpu" or "disk"); load it in bfloat16 (torch_dtype=torch.bfloat16, '
    'dtype= on transformers 5) with attn_implementation="flash_attention_2" so it fits; or, if '
    "only forward() reads these weights, pass allow_offload=True knowingly",
}


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
        return _describe(self.tensors, _SHOWN_IN_TABLE) if self.tensors else ["no meta tensors"]


def find_meta_tensors(model: nn.Module) -> MetaReport:
    """Every parameter and buffer of ``model`` on ``meta``, classified.

    A meta tensor is *offloaded* when an accelerate hook with ``offload=True`` on its module (or
    on an ancestor that places its submodules) has its key in the weights map, so the hook really
    loads it for ``forward`` (a buffer only if persistent and the hook offloads buffers, as in
    accelerate's ``pre_forward``); anything else on ``meta`` is *uninitialised*. ``offloaded_to``
    comes from the weights map, or from ``hf_device_map`` for weights maps of unknown types.

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
    require_module(model, "find_meta_tensors")
    recorded = getattr(model, "hf_device_map", None)
    placement = Placement.of(recorded) if isinstance(recorded, Mapping) and recorded else None
    found: dict[int, MetaTensor] = {}
    # Hooks that place their submodules (``preload_module_classes``, ``cpu_offload`` of a leaf
    # class) load tensors of descendants too; named_modules is pre-order, so ancestors come first.
    placing: dict[str, list[Any]] = {}
    for module_name, module in model.named_modules():
        # ``module.__dict__`` rather than getattr: nn.Module.__getattr__ raises (slowly) for the
        # thousands of modules without a hook, and add_hook_to_module stores it in __dict__.
        hooks = list(iter_hooks(module)) if "_hf_hook" in module.__dict__ else []
        hooks = [hook for hook in hooks if getattr(hook, "offload", False)]
        if any(getattr(hook, "place_submodules", False) for hook in hooks):
            placing[module_name] = [h for h in hooks if getattr(h, "place_submodules", False)]
        # Own tensors without named_parameters' generators: this runs for every module of a model.
        for local, tensor in [*module._parameters.items(), *module._buffers.items()]:  # noqa: SLF001
            if tensor is None or not tensor.is_meta:
                continue
            name = f"{module_name}.{local}" if module_name else local
            offloaded, location = _find_offload(module, module_name, local, hooks, placing)
            if offloaded and location is None and placement is not None:
                entry = locate(placement.entries, name)  # hidden by a weights map of unknown type
                location = entry[1] if entry and entry[1] in OFFLOAD_TARGETS else None  # type: ignore[assignment]
            previous = found.get(id(tensor))
            if previous is not None and (previous.kind == "offloaded" or not offloaded):
                continue  # a tied weight seen again; keep its first name unless this one has data
            found[id(tensor)] = MetaTensor(
                name=previous.name if previous is not None else name,
                kind="offloaded" if offloaded else "uninitialised",
                shape=tuple(tensor.shape),
                dtype=tensor.dtype,
                nbytes=tensor.numel() * tensor.element_size(),
                is_buffer=local in module._buffers,  # noqa: SLF001
                offloaded_to=location,
            )
    offloaded_map = dict(placement.offloaded) if placement is not None else {}
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


def _find_offload(
    module: nn.Module, module_name: str, local: str, hooks: list[Any], placing: dict[str, list[Any]]
) -> tuple[bool, OffloadLocation | None]:
    """Whether an offload hook (its module's or a placing ancestor's) loads a tensor, and where."""
    # accelerate's pre_forward loads named_module_tensors(include_buffers=offload_buffers,
    # remove_non_persistent=True): buffers only when the hook offloads them, never non-persistent.
    is_buffer = local in module._buffers  # noqa: SLF001
    if is_buffer and local in module._non_persistent_buffers_set:  # noqa: SLF001
        return False, None
    candidates = [(hook, local) for hook in hooks]
    ancestor, key = module_name, local
    while ancestor and placing:
        ancestor, _, child = ancestor.rpartition(".")
        key = f"{child}.{key}"
        candidates += [(hook, key) for hook in placing.get(ancestor, [])]
    for hook, hook_key in candidates:
        if is_buffer and not getattr(hook, "offload_buffers", False):
            continue
        found, location = _lookup(getattr(hook, "weights_map", None), hook_key)
        if found:
            return True, location
    return False, None


def _lookup(weights_map: object, key: str) -> tuple[bool, OffloadLocation | None]:
    """Whether ``weights_map`` holds ``key``, and where, without loading it.

    ``key in weights_map`` reads a disk-offloaded tensor from disk; accelerate's maps are read here.
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
    # Unknown mapping: membership may load the tensor, but it is the only truthful check.
    return isinstance(weights_map, Mapping) and key in weights_map, None


def _describe(tensors: tuple[MetaTensor, ...], limit: int) -> list[str | Table]:
    """A summary line and a table of the first ``limit`` tensors, uninitialised ones first."""
    size = format_bytes(sum(tensor.nbytes for tensor in tensors))
    offloaded = [tensor for tensor in tensors if tensor.kind == "offloaded"]
    parts = []
    if offloaded:
        places = sorted({tensor.offloaded_to or "unknown place" for tensor in offloaded})
        parts.append(f"{len(offloaded)} offloaded by accelerate (to {' and '.join(places)})")
    if len(offloaded) < len(tensors):
        parts.append(f"{len(tensors) - len(offloaded)} uninitialised (no data anywhere)")
    noun = "tensor is" if len(tensors) == 1 else "tensors are"
    summary = f"{len(tensors)} {noun} on the meta device ({size}): {', '.join(parts)}."
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
    return [summary, Table(("tensor", "kind", "shape", "dtype", "where"), rows)]


def _message(report: MetaReport, blocking: tuple[MetaTensor, ...], *, allow_offload: bool) -> str:
    lines = [plain(_describe(blocking, _SHOWN_IN_ERROR))]
    if allow_offload and report.offloaded:
        lines.append(f"({len(report.offloaded)} offloaded tensors were allowed.)")
    if report.offloaded_device_map:
        entries = [f"{name}: {value}" for name, value in report.offloaded_device_map.items()]
        more = len(entries) - _ENTRIES_IN_ERROR
        listed = ", ".join(entries[:_ENTRIES_IN_ERROR]) + (f" and {more} more" if more > 0 else "")
        lines.append(f"Offloaded hf_device_map entries: {listed}.")
    kinds = {tensor.kind for tensor in blocking}
    lines += [why for kind, why in _WHY.items() if kind in kinds]
    fixes = [fix for kind, fix in _FIX.items() if kind in kinds]
    lines.append("Fix: " + "; and ".join(fixes) + ".")
    return "\n".join(lines)
