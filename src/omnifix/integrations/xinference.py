"""Xinference's backends with real device names and planned loads: docs/recipes/xinference.md."""

from __future__ import annotations

import functools
import sys
import threading
from typing import TYPE_CHECKING, Any

from omnifix._checks import require_flags
from omnifix._devices import input_device, resolve_device_map
from omnifix._handle import Handle
from omnifix._patch import patch_from_pretrained
from omnifix._plan import require_workload
from omnifix.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import ModuleType

    from omnifix._devices import ResolvedDevice
    from omnifix._plan import Workload

__all__ = ["XinferencePatch", "patch_xinference", "xinference_device_name"]

_MISSING = object()
_LOCK = threading.Lock()


def xinference_device_name(resolved: ResolvedDevice) -> str:
    """The string Xinference's code expects for a resolved device request, in real torch names.

    Args:
        resolved: What :func:`omnifix.resolve_device_map` returned.

    Returns:
        ``"cuda"`` for every GPU (Xinference's backends turn it into ``device_map="auto"``), a
        strategy word such as ``"balanced"`` as is, else the one device (``"cuda:1"``, ``"cpu"``).

    Example:
        >>> import omnifix
        >>> from omnifix.integrations.xinference import xinference_device_name
        >>> xinference_device_name(omnifix.resolve_device_map("cpu"))
        'cpu'
        >>> xinference_device_name(omnifix.types.ResolvedDevice("auto", None))
        'cuda'
    """
    if resolved.input_device is not None:
        return str(resolved.input_device)
    device_map = resolved.device_map
    return "cuda" if device_map == "auto" or not isinstance(device_map, str) else device_map


def _select_device(device: str) -> str:
    """Drop-in for Xinference's ``select_device``, with omnifix's device names and errors."""
    return xinference_device_name(resolve_device_map(device))


class XinferencePatch(Handle):
    """The attributes one :func:`patch_xinference` replaced; ``remove()`` puts them back."""

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        """Nothing replaced yet; :func:`patch_xinference` fills it."""
        super().__init__()
        self._saved: list[tuple[Any, str, object]] = []

    @property
    def replaced(self) -> list[tuple[Any, str]]:
        """``(owner, attribute name)`` pairs currently replaced."""
        return [(owner, name) for owner, name, _ in self._saved]

    def replace(self, owner: Any, name: str, value: object) -> None:
        """Set ``owner.name`` to ``value``, remembering what was there."""
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def _undo(self) -> None:
        with _LOCK:
            while self._saved:  # newest first; an inherited one becomes inherited again
                owner, name, original = self._saved.pop()
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)


def _decide_device(self: Any) -> None:
    """``decide_device`` for a backend: device_map answer and xinference name kept apart."""
    config = getattr(self, "_pytorch_model_config", None) or {}
    self._omnifix_device = resolve_device_map(config.get("device", "auto"))
    self._device = xinference_device_name(self._omnifix_device)


def _wrap_load(
    original: Callable[[Any], None], patched: Callable[[], Handle]
) -> Callable[[Any], None]:
    @functools.wraps(original)
    def load_multimodal_model(self: Any) -> None:
        from torch import nn

        with patched():
            original(self)
        model = getattr(self, "_model", None)
        if isinstance(model, nn.Module):  # where inputs go: the input embedding's device
            self._device = str(input_device(model))

    return load_multimodal_model


def patch_xinference(
    *backends: type[Any],
    modules: Iterable[ModuleType] = (),
    workload: Workload | None = None,
    allow_offload: bool = False,
) -> XinferencePatch:
    """Patch Xinference's device selection and multimodal loading, until restored.

    Replaces ``decide_device`` and ``load_multimodal_model`` of each backend, and ``select_device``
    of each module and of each backend's own module (backends import it by name).

    Args:
        *backends: ``PytorchMultiModalModel`` subclasses whose ``decide_device`` picks one device
            from ``self._pytorch_model_config["device"]``.
        modules: Further modules whose ``select_device`` to replace.
        workload: What planned ``device_map="auto"`` loads are sized for.
        allow_offload: Accept plans that keep weights on the cpu or disk.

    Returns:
        The applied :class:`XinferencePatch`; ``remove()`` it (or use ``with``) to undo.

    Raises:
        InvalidArgumentError: A backend is not a class, a module has no ``select_device``, or
            ``workload``/``allow_offload`` is not one.

    Example:
        >>> import types
        >>> from omnifix.integrations.xinference import patch_xinference
        >>> utils = types.ModuleType("utils")
        >>> utils.select_device = lambda device: device
        >>> with patch_xinference(modules=[utils]):
        ...     utils.select_device("auto")  # a CPU-only machine
        'cpu'
        >>> utils.select_device("auto")
        'auto'
    """
    require_workload(workload)
    require_flags(allow_offload=allow_offload)
    targets = list(modules)
    for module in targets:
        if not hasattr(module, "select_device"):
            raise InvalidArgumentError(
                f"{module!r} has no select_device to patch. Pass xinference.model.utils or a "
                "backend module that imported select_device."
            )
    for backend in backends:
        if not isinstance(backend, type):
            raise InvalidArgumentError(
                f"{backend!r} is not a class. Pass the backend classes themselves, e.g. "
                "Qwen2AudioChatModel, not instances or module paths."
            )
        own = sys.modules.get(backend.__module__)
        if own is not None and hasattr(own, "select_device") and own not in targets:
            targets.append(own)
    patch = XinferencePatch()
    patched = functools.partial(
        patch_from_pretrained, workload=workload, allow_offload=allow_offload
    )
    with _LOCK:
        for module in targets:
            patch.replace(module, "select_device", _select_device)
        for backend in backends:
            load = _wrap_load(backend.load_multimodal_model, patched)
            patch.replace(backend, "decide_device", _decide_device)
            patch.replace(backend, "load_multimodal_model", load)
    return patch
