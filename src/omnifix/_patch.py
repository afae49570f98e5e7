"""``patch_from_pretrained()``: route ``from_pretrained`` calls you do not own through omnifix.

One attribute is replaced, ``transformers.PreTrainedModel.from_pretrained``, which every model
class and the Auto classes end in; docs/recipes/wrapping.md has the rules per ``device_map``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from omnifix._checks import require_flags
from omnifix._compat import AUTO_DTYPE_DEFAULT, deprecated, transformers_at_least
from omnifix._device_map import STRATEGIES, Placement
from omnifix._devices import resolve_device_map
from omnifix._embeddings import pin_embeddings
from omnifix._handle import Handle
from omnifix._load import explicit_map, load_safely, skeleton_of
from omnifix._meta import assert_no_meta
from omnifix._modules import execution_devices
from omnifix._plan import require_workload
from omnifix._stored import stored_weights
from omnifix.errors import OmnifixWarning, UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

    from omnifix._plan import Workload

__all__ = ["FromPretrainedPatch", "install", "patch_from_pretrained", "patched", "uninstall"]

_LOCK = threading.RLock()
#: Active patches, oldest first; the last one's options apply.
_ACTIVE: list[FromPretrainedPatch] = []
#: ``PreTrainedModel.__dict__["from_pretrained"]`` before the first patch (the classmethod).
_SAVED: list[Any] = []
#: Set while the wrapper runs a call, so the calls it makes itself go to the original.
_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("omnifix_routing", default=False)


class FromPretrainedPatch(Handle):
    """One active :func:`omnifix.patch_from_pretrained` (see :class:`omnifix.types.Handle`).

    ``remove()`` takes this patch away; the original ``from_pretrained`` is back when no patch
    is left.

    Attributes:
        workload: What loads planned under this patch are sized for (``None``: the default).
        allow_offload: Whether a plan may keep weights on the cpu or disk.
        strict: Whether an attention implementation that cannot run here raises.
    """

    __slots__ = ("allow_offload", "strict", "workload")

    def __init__(self, *, workload: Workload | None, allow_offload: bool, strict: bool) -> None:
        """Options only; :func:`omnifix.patch_from_pretrained` activates it."""
        super().__init__()
        self.workload = workload
        self.allow_offload = allow_offload
        self.strict = strict

    def _undo(self) -> None:
        from transformers import PreTrainedModel  # imported already: the patch is on it

        with _LOCK:
            _ACTIVE[:] = [entry for entry in _ACTIVE if entry is not self]
            if _ACTIVE:
                return
            original = _SAVED.pop()
            current = PreTrainedModel.__dict__.get("from_pretrained")
            if getattr(getattr(current, "__func__", None), "_omnifix_patch", False):
                setattr(PreTrainedModel, "from_pretrained", original)  # noqa: B010
                return
            # Someone patched over us: putting the original back would drop their patch.
            warnings.warn(
                "PreTrainedModel.from_pretrained was replaced by other code while omnifix's patch "
                "was active, so omnifix left it as it is (omnifix's wrapper may still be inside "
                "it). Remove the other patch first, or install omnifix's patch after it.",
                OmnifixWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        """Options and state."""
        options = f"workload={self.workload!r}, allow_offload={self.allow_offload}"
        return f"FromPretrainedPatch({options}, strict={self.strict}, active={self.active})"


def patch_from_pretrained(
    *, workload: Workload | None = None, allow_offload: bool = False, strict: bool = False
) -> FromPretrainedPatch:
    """Route ``from_pretrained`` of every transformers model class through omnifix, until removed.

    Devices are normalised, ``device_map="auto"`` (and the other strategy words) is planned and
    refused with :class:`omnifix.InsufficientMemoryError` instead of offloading silently, weights
    on ``meta`` raise, split models get their embeddings pinned; calls without a ``device_map``
    run unchanged. Patches stack, and the newest one's options apply.

    Args:
        workload: What the planned loads are sized for (:class:`omnifix.Workload`).
        allow_offload: Accept plans (and explicit maps) that keep weights on the cpu or disk.
        strict: Raise instead of falling back when a requested attention cannot run.

    Returns:
        The active patch: ``remove()`` it, or use it as a context manager.

    Raises:
        InvalidArgumentError: ``workload`` is not a :class:`omnifix.Workload`.
        UnsupportedModelError: transformers is not installed.

    Example:
        >>> import tempfile, omnifix
        >>> import omnifix.testing as ot
        >>> from transformers import AutoModelForCausalLM
        >>> with tempfile.TemporaryDirectory() as tmp, omnifix.patch_from_pretrained() as patch:
        ...     path = ot.save_tiny_model("qwen2", tmp)
        ...     model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
        ...     AutoModelForCausalLM.from_pretrained(path, device_map="cuda:7")
        Traceback (most recent call last):
        ...
        omnifix.errors.DeviceUnavailableError: ...
        >>> str(model.device), patch.active
        ('cpu', False)
    """
    require_workload(workload)
    require_flags(allow_offload=allow_offload, strict=strict)
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise UnsupportedModelError(
            "omnifix.patch_from_pretrained() patches transformers.PreTrainedModel.from_pretrained,"
            f" and transformers does not import: {error}. Install it: pip install transformers."
        ) from error
    patch = FromPretrainedPatch(workload=workload, allow_offload=allow_offload, strict=strict)
    with _LOCK:
        if not _ACTIVE:  # the first patch replaces the classmethod object itself
            _SAVED.append(PreTrainedModel.__dict__["from_pretrained"])
            wrapper = classmethod(_wrap(_SAVED[-1].__func__))
            setattr(PreTrainedModel, "from_pretrained", wrapper)  # noqa: B010
        _ACTIVE.append(patch)
    return patch


def install(
    *, workload: Workload | None = None, allow_offload: bool = False, strict: bool = False
) -> FromPretrainedPatch:
    """Deprecated: :func:`omnifix.patch_from_pretrained`."""
    deprecated("omnifix.install()", "omnifix.patch_from_pretrained()")
    return patch_from_pretrained(workload=workload, allow_offload=allow_offload, strict=strict)


def uninstall() -> bool:
    """Deprecated: ``remove()`` the handle :func:`omnifix.patch_from_pretrained` returned."""
    deprecated("omnifix.uninstall()", "the remove() of the patch_from_pretrained() handle")
    with _LOCK:
        newest = _ACTIVE[-1] if _ACTIVE else None
    if newest is not None:
        newest.remove()
    return newest is not None


def patched(
    *, workload: Workload | None = None, allow_offload: bool = False, strict: bool = False
) -> contextlib.AbstractContextManager[FromPretrainedPatch]:
    """Deprecated: ``with omnifix.patch_from_pretrained(): ...``."""
    deprecated("omnifix.patched()", "with omnifix.patch_from_pretrained(): ...")
    return _patched(workload=workload, allow_offload=allow_offload, strict=strict)


@contextlib.contextmanager
def _patched(**options: Any) -> Iterator[FromPretrainedPatch]:
    with patch_from_pretrained(**options) as patch:
        yield patch


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
            device_map = kwargs.get("device_map")
            if device_map is None:
                return original(cls, *args, **kwargs)
            if isinstance(device_map, Mapping):
                named = kwargs.get("pretrained_model_name_or_path", args[0] if args else None)
                # One checkpoint to read: the map is checked against its model, as load_safely does.
                skeleton = skeleton_of(named, kwargs, cls) if len(args) <= 1 and named else None
                normalized: object = explicit_map(
                    device_map, allow_offload=options.allow_offload, model=skeleton
                )
            elif isinstance(device_map, str) and device_map.strip().lower() in STRATEGIES:
                normalized = "auto"  # any strategy word: planned
            else:  # a device ("cuda" with several GPUs comes back as "auto": planned)
                normalized = resolve_device_map(device_map).device_map
            if normalized == "auto":
                return _planned(original, cls, options, args, kwargs)
            result = original(cls, *args, **{**kwargs, "device_map": normalized})
            offloads = isinstance(normalized, Mapping) and Placement.of(normalized).offloads
            _check(result[0] if isinstance(result, tuple) else result, allow_offload=offloads)
            return result
        finally:
            _ROUTING.reset(token)

    from_pretrained._omnifix_patch = True  # type: ignore[attr-defined]  # noqa: SLF001
    return from_pretrained


def _check(model: Any, *, allow_offload: bool) -> None:
    """What ``load_safely`` checks after loading: no meta tensors, embeddings pinned if split."""
    assert_no_meta(model, allow_offload=allow_offload)
    if len(execution_devices(model)) > 1:
        with contextlib.suppress(UnsupportedModelError):  # no token embedding: nothing to pin
            pin_embeddings(model)


def _planned(
    original: Callable[..., Any],
    cls: type[Any],
    options: FromPretrainedPatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A strategy word: plan and load with ``load_safely`` (which calls the original)."""
    rest = {key: value for key, value in kwargs.items() if key != "device_map"}
    if "pretrained_model_name_or_path" in rest:
        args = (rest.pop("pretrained_model_name_or_path"), *args)
    if len(args) != 1:
        # Positional model arguments load_safely has no place for: accelerate places the model.
        result = original(cls, *args, **kwargs)
        _check(result, allow_offload=options.allow_offload)
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
    ``load_safely``, so it is resolved here as transformers does: the config's dtype, else the
    stored one (read from the safetensors headers); transformers 5 defaults to ``"auto"``, older
    releases to torch's default dtype.
    """
    import torch
    import transformers

    requested = kwargs.pop("dtype", None)
    alias = kwargs.pop("torch_dtype", None)
    requested = requested if requested is not None else alias
    if requested is None:
        if not transformers_at_least(AUTO_DTYPE_DEFAULT):
            return torch.get_default_dtype()
        requested = "auto"
    if not (isinstance(requested, str) and requested.strip().lower() == "auto"):
        return requested  # type: ignore[no-any-return,unused-ignore]
    config = kwargs.get("config")
    if not isinstance(config, transformers.PretrainedConfig):
        config = cls.config_class.from_pretrained(config or pretrained)
    # dtype from 4.56 on; torch_dtype before (read from __dict__: later releases warn on access).
    found = getattr(config, "dtype", None) or config.__dict__.get("torch_dtype")
    if found is None:
        stored = stored_weights(
            pretrained,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            subfolder=kwargs.get("subfolder") or None,
        )
        found = None if stored is None else stored.auto_dtype
    return found or torch.get_default_dtype()  # type: ignore[no-any-return,unused-ignore]
