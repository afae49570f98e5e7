"""``load_safely``: plan the placement, refuse what does not fit, load, check, pin, report.

``from_pretrained(..., device_map="auto")`` degrades silently: weights that do not fit go to the
cpu or disk behind hooks, activations all land on the first GPU, and the embedding seam of a split
model mixes devices. :func:`load_safely` makes the plan first (:func:`omnifix.plan_placement` on
the measured budgets), refuses with :class:`omnifix.InsufficientMemoryError` before anything is
allocated, loads with the plan's explicit map, checks (:func:`omnifix.assert_no_meta`), gives a
split model lean hooks and pinned embeddings, and remembers the plan for
:func:`omnifix.placement_report`. A refused or failed load leaves no model behind.
"""

from __future__ import annotations

import gc
import os
import tempfile
import traceback
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

from omnifix._attention import choose_attention_for, choose_dtype, gpu_capabilities
from omnifix._compat import dtype_keyword
from omnifix._config import HUB_KWARGS, model_class_for, read_config
from omnifix._device_map import Placement
from omnifix._devices import (
    cuda_device_count,
    normalize_device,
    normalize_map,
    spreads,
)
from omnifix._dispatch import lean_dispatch
from omnifix._embeddings import pin_embeddings
from omnifix._meta import assert_no_meta
from omnifix._modules import execution_devices
from omnifix._plan import plan_placement, require_workload
from omnifix._plan.budgets import host_memory
from omnifix._report import LoadRecord, remember
from omnifix._units import parse_size
from omnifix.errors import (
    CheckpointError,
    DeviceError,
    InsufficientMemoryError,
    InvalidArgumentError,
    OmnifixError,
    OmnifixWarning,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from omnifix._plan import PlacementPlan, Workload
    from omnifix._types import AttentionRequest, DeviceLike

    _M = TypeVar("_M", bound=PreTrainedModel)

__all__ = ["explicit_map", "load_safely"]

#: How many entries of an explicit device_map an error message lists.
_SHOWN_ENTRIES: Final = 6


# --------------------------------------------------------------------------------------------
# Before loading: config, class, devices, budgets
# --------------------------------------------------------------------------------------------


def _config_and_class(
    pretrained: str | os.PathLike[str], kwargs: Mapping[str, Any], model_class: type[Any] | None
) -> tuple[Any, type[Any]]:
    """The config ``from_pretrained`` will use (read now, without the weights), and the class."""
    import transformers

    given = kwargs.get("config")
    if isinstance(given, transformers.PretrainedConfig):
        return given, model_class_for(given, model_class)
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    config = read_config(pretrained if given is None else given, model_class=model_class, **hub)
    return config, model_class_for(config, model_class)


def _targets(device: DeviceLike) -> list[torch.device]:
    """The devices ``device`` asks for: every visible GPU for "auto"/"cuda", one GPU, or the cpu."""
    import torch

    if spreads(device) and cuda_device_count():
        return [torch.device("cuda", index) for index in range(cuda_device_count())]
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

    if spreads(device) and max_memory is None:
        return None
    cpu = torch.device("cpu")
    devices = [*targets, *([cpu] if allow_offload and cpu not in targets else [])]
    budgets: dict[DeviceLike, int] = {
        str(target): (
            int(torch.cuda.mem_get_info(target)[0]) if target.type == "cuda" else host_memory()
        )
        for target in devices
    }
    for key, cap in (max_memory or {}).items():
        name = str(normalize_device(key))
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


def explicit_map(
    device_map: object,
    *,
    allow_offload: bool,
    device: DeviceLike = "auto",
    max_memory: object = None,
) -> dict[str, str]:
    """A caller's ``device_map`` for ``from_pretrained``: checked, in the one spelling of maps.

    Raises:
        InvalidArgumentError: Not a dict (strategy words are what planning replaces), given with
            ``device=``/``max_memory=``, or offloading weights without ``allow_offload=True``.
        DeviceError: A value that is not a device of this machine.
    """
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
    normalized = normalize_map(device_map)
    offloaded = list(Placement.of(normalized).offloaded.items())
    if offloaded and not allow_offload:
        shown = ", ".join(f"{name!r}: {value!r}" for name, value in offloaded[:_SHOWN_ENTRIES])
        more = len(offloaded) - _SHOWN_ENTRIES
        raise InvalidArgumentError(
            f"The device_map offloads {shown}{f' and {more} more' if more > 0 else ''}: "
            "accelerate keeps those weights off the GPU and they are meta tensors outside "
            "forward(). Map them to GPUs, or pass allow_offload=True to accept the offload "
            "knowingly."
        )
    return normalized


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


def load_safely(  # noqa: C901 - one linear recipe, commented step by step
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
            stream their weights; :func:`omnifix.placement_report` says which hooks are in place.
        **from_pretrained_kwargs: Forwarded untouched to ``from_pretrained`` (``revision``,
            ``subfolder``, ``trust_remote_code``, ``quantization_config``, config overrides...).
            An explicit ``device_map`` dict is honoured (checked, not planned); a strategy word
            is refused, since planning is what replaces it.

    Returns:
        The model, in eval mode, with no meta tensors (except offloaded ones when
        ``allow_offload=True``) and, when it spans several devices, lean hooks (unless
        ``hooks="accelerate"`` or offloaded) and its input embeddings pinned.
        :func:`omnifix.placement_report` tells where everything went.

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
        >>> import tempfile, torch, omnifix
        >>> import omnifix.testing as ot
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = ot.save_tiny_model("qwen2", tmp)
        ...     model = omnifix.load_safely(path, device="cpu")
        >>> model.dtype, model.config._attn_implementation
        (torch.float32, 'sdpa')
        >>> report = omnifix.placement_report(model)
        >>> report.strategy, [usage.device for usage in report.devices]
        ('single', ['cpu'])
    """
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
    device_map: Mapping[str, object]
    if user_map is not None:
        device_map = explicit_map(
            user_map, allow_offload=allow_offload, device=device, max_memory=max_memory
        )
        used = {normalize_device(value) for value in device_map.values() if value != "disk"}
        capabilities = gpu_capabilities(used)
    else:
        targets = _targets(device)
        capabilities = gpu_capabilities(targets)
    chosen_dtype = choose_dtype(dtype, capabilities=capabilities)
    attention, planned_attention = choose_attention_for(
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
        assert_no_meta(model, allow_offload=allow_offload)
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
    remember(model, _record(plan, device_map, chosen_dtype, pinned))
    return model


def _hook_split(model: nn.Module, device_map: Mapping[str, object], hooks: str) -> tuple[str, ...]:
    """Lean hooks and pinned embeddings for a model on several devices; the pinned names.

    Lean hooks unless ``hooks="accelerate"`` or the map offloads (offloaded weights need
    accelerate's streaming).
    """
    if len(execution_devices(model)) <= 1:
        return ()
    if hooks == "lean" and not Placement.of(device_map).offloads:
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
) -> LoadRecord:
    if plan is None:
        places = sorted({str(value) for value in device_map.values()})
        reason = f"the caller's device_map over {', '.join(places)}"
        return LoadRecord("explicit", reason, dtype, {}, pinned)
    predicted = {
        row.device: (row.total, None if row.unlimited else row.budget)
        for row in plan.devices
        if row.device in plan.devices_used
    }
    return LoadRecord(plan.strategy, plan.reason, dtype, predicted, pinned)
