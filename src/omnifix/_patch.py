"""``patched()``: route ``from_pretrained`` calls you do not own through omnifix's safeguards.

Serving frameworks and scripts call ``SomeModel.from_pretrained(path, device_map="auto")`` deep
inside code you cannot edit. :func:`patched` (a context manager) and :func:`install` /
:func:`uninstall` (a switch) replace ONE attribute,
``transformers.PreTrainedModel.from_pretrained``, with a classmethod wrapper that sees the
class being loaded. Every model class inherits it, and the Auto classes
(``_BaseAutoModelClass.from_pretrained``) end in ``model_class.from_pretrained``, so one patch
covers both on transformers 4.45, 4.57 and 5.x. Classes that override
``from_pretrained`` and call ``super()`` (Qwen2.5-Omni) are covered too; an override that does not
call ``super()`` is not.

What a call under the patch gets, by its ``device_map``:

* none (or ``None``): nothing changes, the original runs with the same arguments;
* a device (``"cuda:1"``, ``1``, ``torch.device("cpu")``): normalised by
  :func:`omnifix.resolve_device_map` (``"cuda"`` on a machine with several GPUs means all of them,
  and is planned as below), then the original runs with that map;
* an explicit ``{module: device}`` dict: values normalised; cpu/disk entries refused unless
  ``allow_offload=True`` (as :func:`omnifix.load_safely` does); then the original runs;
* a strategy word (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``): planned
  and loaded by :func:`omnifix.load_safely` over every visible GPU (the cpu on a machine without
  one), budgets capped by the call's ``max_memory``, in the dtype the plain call would have used.
  What does not fit raises :class:`omnifix.InsufficientMemoryError` instead of a silent cpu/disk
  offload (an explicit offload plan with ``allow_offload=True``).

Then the model is checked (:func:`omnifix.assert_no_meta`) and, when it spans several devices,
its input embeddings are pinned (:func:`omnifix.pin_embeddings`).

Thread safety: installing and removing are serialised by a lock, and any number of nested or
overlapping :func:`patched` blocks (also in different threads, exited in any order) restore
the original exactly once, when the last one ends. The patch itself is process-wide, like any
attribute of a class: while one is active, every thread's ``from_pretrained`` goes through it,
with the options of the most recently installed patch still active. The wrapper's own calls to
the original (by :func:`omnifix.load_safely`) are marked per thread and per task
(:mod:`contextvars`), so they are never routed twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from omnifix.errors import OmnifixWarning, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    import torch

    from omnifix._plan import Workload

__all__ = ["Patch", "install", "patched", "uninstall"]

#: ``device_map`` values that ask accelerate to place the model (and offload silently).
_STRATEGIES: Final = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})

_LOCK = threading.RLock()
#: Active patches, oldest first; the last one's options apply.
_ACTIVE: list[Patch] = []
#: ``PreTrainedModel.__dict__["from_pretrained"]`` before the first patch (the classmethod).
_SAVED: list[Any] = []
#: Set while the wrapper runs a call, so the calls it makes itself go to the original.
_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("omnifix_routing", default=False)


class Patch:
    """One active :func:`install` (or :func:`patched` block): its options, and its undo.

    Use it as a context manager, or call :meth:`restore`; both are idempotent.

    Attributes:
        workload: What loads planned under this patch are sized for (``None``: the planner's
            default).
        allow_offload: Whether a plan may keep weights on the cpu or disk.
        strict: Whether an attention implementation that cannot run here raises.
    """

    __slots__ = ("allow_offload", "strict", "workload")

    def __init__(self, *, workload: Workload | None, allow_offload: bool, strict: bool) -> None:
        """Options only; :func:`install` activates it."""
        self.workload = workload
        self.allow_offload = allow_offload
        self.strict = strict

    @property
    def active(self) -> bool:
        """Whether this patch is still installed."""
        with _LOCK:
            return any(entry is self for entry in _ACTIVE)

    def restore(self) -> None:
        """Remove this patch; the original ``from_pretrained`` is back when none is left."""
        with _LOCK:
            for index, entry in enumerate(_ACTIVE):
                if entry is self:
                    del _ACTIVE[index]
                    break
            else:
                return
            if not _ACTIVE:
                _unpatch()

    def __enter__(self) -> Patch:  # noqa: PYI034 - final in spirit; Self needs 3.11 typing
        """Return the patch (already active)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore, also after an exception (which propagates)."""
        self.restore()

    def __repr__(self) -> str:
        """Options and state."""
        return (
            f"Patch(workload={self.workload!r}, allow_offload={self.allow_offload}, "
            f"strict={self.strict}, active={self.active})"
        )


def install(
    *, workload: Workload | None = None, allow_offload: bool = False, strict: bool = False
) -> Patch:
    """Route ``from_pretrained`` of every transformers model class through omnifix, until undone.

    The switch form of :func:`patched`: the patch stays until the returned :class:`Patch` is
    restored (``with install(): ...``, ``patch.restore()``) or :func:`uninstall` removes it.
    Installing again stacks: the newest options apply, and the original comes back when the last
    patch is removed.

    Args:
        workload: What the planned loads are sized for (:class:`omnifix.Workload`).
        allow_offload: Accept plans (and explicit maps) that keep weights on the cpu or disk.
        strict: Raise instead of falling back when a requested attention cannot run.

    Returns:
        The active :class:`Patch`.

    Raises:
        InvalidArgumentError: ``workload`` is not a :class:`omnifix.Workload`.
        UnsupportedModelError: transformers is not installed.

    Example:
        >>> from transformers import PreTrainedModel
        >>> from omnifix._patch import install, uninstall
        >>> plain = PreTrainedModel.__dict__["from_pretrained"]
        >>> patch = install(allow_offload=False)
        >>> PreTrainedModel.__dict__["from_pretrained"] is plain, patch.active
        (False, True)
        >>> uninstall(), PreTrainedModel.__dict__["from_pretrained"] is plain
        (True, True)
    """
    from omnifix._plan import require_workload

    require_workload(workload)
    patch = Patch(workload=workload, allow_offload=allow_offload, strict=strict)
    with _LOCK:
        if not _ACTIVE:
            _patch()
        _ACTIVE.append(patch)
    return patch


def uninstall() -> bool:
    """Remove the most recent :func:`install` still active.

    Returns:
        ``True`` when a patch was removed, ``False`` when none was active.

    Example:
        >>> from omnifix._patch import uninstall
        >>> uninstall()
        False
    """
    with _LOCK:
        if not _ACTIVE:
            return False
        _ACTIVE[-1].restore()
        return True


@contextlib.contextmanager
def patched(
    *, workload: Workload | None = None, allow_offload: bool = False, strict: bool = False
) -> Iterator[Patch]:
    """Inside the block, ``from_pretrained`` of transformers models goes through omnifix.

    Devices are normalised, ``device_map="auto"`` (and the other strategy words) is planned and
    refused with :class:`omnifix.InsufficientMemoryError` instead of offloading silently,
    weights on ``meta`` raise, split models get their embeddings pinned. Calls without a
    ``device_map`` run unchanged. The original ``from_pretrained`` is restored on exit, also
    after an exception; blocks nest. Also usable as a decorator.

    Args:
        workload: What the planned loads are sized for (:class:`omnifix.Workload`).
        allow_offload: Accept plans (and explicit maps) that keep weights on the cpu or disk.
        strict: Raise instead of falling back when a requested attention cannot run.

    Yields:
        The active :class:`Patch`.

    Raises:
        InvalidArgumentError: ``workload`` is not a :class:`omnifix.Workload`.
        UnsupportedModelError: transformers is not installed.

    Example:
        >>> import tempfile
        >>> import omnifix.testing as ot
        >>> from transformers import AutoModelForCausalLM
        >>> from omnifix._patch import patched
        >>> with tempfile.TemporaryDirectory() as tmp, patched():
        ...     path = ot.save_tiny_model("qwen2", tmp)
        ...     model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda:0")
        Traceback (most recent call last):
        ...
        omnifix.errors.DeviceUnavailableError: ...
        >>> with tempfile.TemporaryDirectory() as tmp, patched():
        ...     path = ot.save_tiny_model("qwen2", tmp)
        ...     model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
        >>> str(model.device)
        'cpu'
    """
    patch = install(workload=workload, allow_offload=allow_offload, strict=strict)
    try:
        yield patch
    finally:
        patch.restore()


# --------------------------------------------------------------------------------------------
# The one patched attribute
# --------------------------------------------------------------------------------------------


def _base() -> type[Any]:
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise UnsupportedModelError(
            "omnifix.patched() patches transformers.PreTrainedModel.from_pretrained, and "
            f"transformers does not import: {error}. Install it: pip install transformers."
        ) from error
    return PreTrainedModel


def _patch() -> None:
    base = _base()
    original = base.__dict__["from_pretrained"]  # the classmethod object itself
    _SAVED.append(original)
    setattr(base, "from_pretrained", classmethod(_wrap(original.__func__)))  # noqa: B010


def _unpatch() -> None:
    base = _base()
    original = _SAVED.pop()
    current = base.__dict__.get("from_pretrained")
    if getattr(getattr(current, "__func__", None), "_omnifix_patch", False):
        setattr(base, "from_pretrained", original)  # noqa: B010
        return
    # Someone patched over us: putting the original back would drop their patch.
    warnings.warn(
        "PreTrainedModel.from_pretrained was replaced by other code while omnifix's patch was "
        "active, so omnifix left it as it is (omnifix's wrapper may still be inside it). Remove "
        "the other patch first, or install omnifix's patch after it.",
        OmnifixWarning,
        stacklevel=4,
    )


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    """The classmethod body: ``functools.wraps`` keeps the name, docs and signature."""

    @functools.wraps(original)
    def from_pretrained(cls: type[Any], /, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            options = _ACTIVE[-1] if _ACTIVE else None
        if options is None or _ROUTING.get():
            return original(cls, *args, **kwargs)
        token = _ROUTING.set(True)
        try:
            return _route(original, cls, options, args, kwargs)
        finally:
            _ROUTING.reset(token)

    from_pretrained._omnifix_patch = True  # type: ignore[attr-defined]  # noqa: SLF001
    return from_pretrained


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------


def _route(
    original: Callable[..., Any],
    cls: type[Any],
    options: Patch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    from omnifix._devices import resolve_device_map
    from omnifix._load import _explicit_map

    device_map = kwargs.get("device_map")
    if device_map is None:
        return original(cls, *args, **kwargs)
    if isinstance(device_map, str) and device_map.strip().lower() in _STRATEGIES:
        return _planned(original, cls, options, args, kwargs)
    if isinstance(device_map, Mapping):
        normalized: object = _explicit_map(
            device_map, allow_offload=options.allow_offload, device="auto", max_memory=None
        )
    else:
        normalized = resolve_device_map(device_map).device_map
        if normalized == "auto":  # "cuda" with several GPUs: all of them, planned
            return _planned(original, cls, options, args, kwargs)
    result = original(cls, *args, **{**kwargs, "device_map": normalized})
    offloads = (
        isinstance(normalized, Mapping)
        and any(value in ("cpu", "disk") for value in normalized.values())
        and len(set(normalized.values())) > 1
    )
    _check(result[0] if isinstance(result, tuple) else result, allow_offloaded=offloads)
    return result


def _check(model: Any, *, allow_offloaded: bool) -> None:
    """What ``load_safely`` checks after loading: no meta tensors, embeddings pinned if split."""
    from omnifix._embeddings import pin_embeddings
    from omnifix._load import _execution_devices
    from omnifix._meta import assert_no_meta

    assert_no_meta(model, allow_offloaded=allow_offloaded)
    if len(_execution_devices(model)) > 1:
        with contextlib.suppress(UnsupportedModelError):  # no token embedding: nothing to pin
            pin_embeddings(model)


def _planned(
    original: Callable[..., Any],
    cls: type[Any],
    options: Patch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A strategy word: plan and load with ``load_safely`` (which calls the original)."""
    from omnifix._load import load_safely

    rest = dict(kwargs)
    rest.pop("device_map")
    if "pretrained_model_name_or_path" in rest:
        args = (rest.pop("pretrained_model_name_or_path"), *args)
    if len(args) != 1:
        # Extra positional model arguments: load_safely has no place for them, so let
        # accelerate place the model and check the result afterwards.
        result = original(cls, *args, **kwargs)
        _check(result, allow_offloaded=options.allow_offload)
        return result
    pretrained = args[0]
    max_memory = rest.pop("max_memory", None)
    if isinstance(max_memory, Mapping):  # accelerate's "disk" key: no budget to plan with
        max_memory = {key: value for key, value in max_memory.items() if key != "disk"}
    dtype = _plain_dtype(cls, pretrained, rest)
    attention = rest.pop("attn_implementation", None) or "auto"
    return load_safely(
        pretrained,
        model_class=cls,
        device="auto",
        dtype=dtype,
        attn_implementation=attention,
        max_memory=max_memory or None,
        workload=options.workload,
        allow_offload=options.allow_offload,
        strict=options.strict,
        **rest,
    )


def _plain_dtype(cls: type[Any], pretrained: Any, kwargs: dict[str, Any]) -> torch.dtype | str:
    """The dtype the plain call would load in (popping ``dtype``/``torch_dtype`` from kwargs).

    ``"auto"`` means the checkpoint's dtype for ``from_pretrained`` and "what suits the GPU" for
    ``load_safely``, so it is resolved here from the config; transformers 5 defaults to
    ``"auto"``, older releases to torch's default dtype.
    """
    import torch
    import transformers

    from omnifix._attention import _transformers_release

    requested = kwargs.pop("dtype", None)
    alias = kwargs.pop("torch_dtype", None)
    requested = requested if requested is not None else alias
    if requested is None:
        if _transformers_release()[0] < 5:  # noqa: PLR2004 - the release that changed the default
            return torch.get_default_dtype()
        requested = "auto"
    if not (isinstance(requested, str) and requested.strip().lower() == "auto"):
        return requested  # type: ignore[no-any-return,unused-ignore]
    config = kwargs.get("config")
    if not isinstance(config, transformers.PretrainedConfig):
        config = cls.config_class.from_pretrained(config or pretrained)
    found = getattr(config, "dtype", None) if hasattr(config, "dtype") else None
    found = found or config.__dict__.get("torch_dtype")
    return found or torch.get_default_dtype()  # type: ignore[no-any-return,unused-ignore]
