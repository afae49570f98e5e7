"""Xinference's transformers backends: real device names, planned loads, a real input device.

Xinference's ``select_device`` answers ``"rocm"`` (a name torch rejects) and refuses
``"cuda:1"``; its multimodal backends keep one attribute, ``self._device``, both for
``from_pretrained(device_map=...)`` and for ``inputs.to(...)``, so a backend that stores
``"auto"`` there fails every request. :func:`patch_xinference` replaces ``select_device``,
``decide_device`` and ``load_multimodal_model`` on the modules and backend classes you pass:
devices resolve through :func:`omnifix.resolve_device_map`, loads run under
:func:`omnifix.patch_from_pretrained`, and ``self._device`` becomes the loaded model's
:func:`omnifix.input_device`. docs/recipes/xinference.md has the details and which backends to
pass.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import TYPE_CHECKING, Any

from omnifix._devices import input_device, resolve_device_map
from omnifix._handle import Handle
from omnifix._patch import patch_from_pretrained
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
    """The string Xinference's code expects for a resolved device request.

    Xinference spells "all GPUs" as ``"cuda"`` (its backends turn that into
    ``device_map="auto"``) and one device by its name; this maps an
    :class:`omnifix.types.ResolvedDevice` onto that convention with real torch names only.

    Args:
        resolved: What :func:`omnifix.resolve_device_map` returned.

    Returns:
        ``"cuda"`` when the map spreads the model over every GPU, the strategy word for
        ``"balanced"``-like maps, else the one device, e.g. ``"cuda:1"`` or ``"cpu"``.

    Example:
        >>> import omnifix
        >>> from omnifix.integrations.xinference import xinference_device_name
        >>> xinference_device_name(omnifix.resolve_device_map("auto"))  # a CPU-only machine
        'cpu'
        >>> from omnifix.types import ResolvedDevice
        >>> xinference_device_name(ResolvedDevice("auto", None))
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
    """The replaced attributes of one :func:`patch_xinference` call, and their undo.

    ``remove()`` (or leaving a ``with`` block) puts every original back, newest first;
    inherited ones become inherited again (see :class:`omnifix.Handle`).
    """

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
            while self._saved:
                owner, name, original = self._saved.pop()
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)


def _decide_device(self: Any) -> None:
    """``decide_device`` for a backend: device_map answer and xinference name kept apart."""
    config = getattr(self, "_pytorch_model_config", None) or {}
    resolved = resolve_device_map(config.get("device", "auto"))
    self._omnifix_device = resolved
    self._device = xinference_device_name(resolved)


def _wrap_load(
    original: Callable[[Any], None], *, workload: Workload | None, allow_offload: bool
) -> Callable[[Any], None]:
    @functools.wraps(original)
    def load_multimodal_model(self: Any) -> None:
        from torch import nn

        with patch_from_pretrained(workload=workload, allow_offload=allow_offload):
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

    For each backend class, ``decide_device`` and ``load_multimodal_model`` are replaced (see the
    module docs); ``select_device`` is replaced in every module of ``modules`` and in each
    backend's own module that has one (backends import it by name, so patching
    ``xinference.model.utils`` alone would not reach them). Nothing is imported from Xinference:
    pass its modules and classes, e.g.::

        import xinference.model.utils as xutils
        from xinference.model.llm.transformers.multimodal.qwen2_audio import Qwen2AudioChatModel
        from xinference.model.llm.transformers.multimodal.qwen2_vl import PytorchQwen2VLModel

        handle = patch_xinference(Qwen2AudioChatModel, PytorchQwen2VLModel, modules=[xutils])

    Args:
        *backends: ``PytorchMultiModalModel`` subclasses whose ``decide_device`` picks one device
            from ``self._pytorch_model_config["device"]``.
        modules: Further modules whose ``select_device`` to replace.
        workload: What planned ``device_map="auto"`` loads are sized for.
        allow_offload: Accept plans that keep weights on the cpu or disk.

    Returns:
        The applied :class:`XinferencePatch`; ``remove()`` it (or use ``with``) to undo.

    Raises:
        InvalidArgumentError: A backend is not a class, or a module has no ``select_device``.

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
    with _LOCK:
        for module in targets:
            patch.replace(module, "select_device", _select_device)
        for backend in backends:
            load = _wrap_load(
                backend.load_multimodal_model, workload=workload, allow_offload=allow_offload
            )
            patch.replace(backend, "decide_device", _decide_device)
            patch.replace(backend, "load_multimodal_model", load)
    return patch
