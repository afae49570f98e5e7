"""``load_safely``: plan, refuse what does not fit, load, check, pin, report (docs/loading.md)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import shutil
import tempfile
import traceback
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

from omnifix._attention import choose_attention_for, choose_dtype, gpu_capabilities
from omnifix._checks import require_flags
from omnifix._compat import dtype_keyword
from omnifix._config import HUB_KWARGS, model_class_for, read_config
from omnifix._copies import check_copies
from omnifix._device_map import Placement, check_map, spell
from omnifix._devices import cuda_device_count, normalize_device, normalize_map, spreads
from omnifix._dispatch import lean_dispatch
from omnifix._embeddings import pin_embeddings
from omnifix._meta import assert_no_meta
from omnifix._modules import execution_devices
from omnifix._parallel_load import PARALLEL_MODES, load_tensor_parallel
from omnifix._plan import plan_placement, require_workload
from omnifix._plan.budgets import enable_expandable_segments, host_memory
from omnifix._plan.quantization import bnb_config, require_bitsandbytes
from omnifix._plan.skeleton import load_skeleton
from omnifix._report import LoadRecord, remember, sub_model_attention
from omnifix._units import parse_size
from omnifix._verify import baseline
from omnifix._verify import verify_workload as run_workload
from omnifix.errors import (
    CheckpointError,
    DeviceError,
    DeviceUnavailableError,
    InsufficientMemoryError,
    InvalidArgumentError,
    OmnifixError,
    OmnifixWarning,
    QuantizationUnavailableError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from omnifix._parallel_load import ParallelMode
    from omnifix._plan import PlacementPlan, Workload
    from omnifix._types import AttentionRequest, DeviceLike
    from omnifix._verify import Baseline

    _M = TypeVar("_M", bound=PreTrainedModel)

__all__ = ["explicit_map", "load_safely", "skeleton_of"]

_SHOWN_ENTRIES: Final = 6  # entries of an explicit device_map that an error message lists


def _config_and_class(
    pretrained: str | os.PathLike[str], kwargs: Mapping[str, Any], model_class: type[Any] | None
) -> tuple[Any, type[Any]]:
    """The config ``from_pretrained`` will use (read now, without the weights), and the class."""
    import transformers

    config = kwargs.get("config")
    if not isinstance(config, transformers.PretrainedConfig):
        source = pretrained if config is None else config
        hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        config = read_config(source, model_class=model_class, **hub)
    return config, model_class_for(config, model_class)


def _require_checkpoint(pretrained: object) -> None:
    """Refuse what is no checkpoint name before anything is read or downloaded."""
    if not isinstance(pretrained, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"pretrained={pretrained!r} is not a checkpoint. Pass the folder save_pretrained "
            "wrote (a str or a Path), or a Hub model id such as 'Qwen/Qwen2.5-VL-7B-Instruct'."
        )
    if Path(pretrained).is_file():
        raise CheckpointError(
            f"{os.fspath(pretrained)!r} is a file, and from_pretrained reads a checkpoint folder "
            f"(config.json and the weights). Pass the folder that holds it: "
            f"{os.fspath(Path(pretrained).parent)!r}."
        )


def _require_arguments(
    pretrained: object, max_memory: object, *, hooks: object, allow_offload: object, strict: object
) -> None:
    """Refuse what load_safely cannot use, before anything is read or downloaded."""
    _require_checkpoint(pretrained)
    require_flags(allow_offload=allow_offload, strict=strict)
    if max_memory is not None and not isinstance(max_memory, Mapping):
        raise InvalidArgumentError(
            f"max_memory={max_memory!r} is not a mapping of devices to sizes. Pass one, as "
            "from_pretrained takes it: {0: '20GiB'} for a GPU, {'cpu': '10GiB'} for the host."
        )
    if hooks not in ("lean", "accelerate"):
        raise InvalidArgumentError(
            f'load_safely got hooks={hooks!r}. Pass hooks="lean" (omnifix\'s light hooks for '
            'a split model, the default) or hooks="accelerate" (keep accelerate\'s).'
        )


def _quantization(
    quantization: object, kwargs: dict[str, Any], targets: list[torch.device]
) -> object:
    """What to plan, checked against the installed bitsandbytes before anything is read.

    ``quantization``, or a ``BitsAndBytesConfig`` given as ``quantization_config`` (taken out
    of ``kwargs``; other quantisation methods pass through unplanned).
    """
    given = kwargs.get("quantization_config")
    if given is not None and type(given).__name__ == "BitsAndBytesConfig":
        if quantization is not None:
            raise InvalidArgumentError(
                "Both quantization= and quantization_config= were given. Pass one: load_safely "
                "plans either and passes the config to from_pretrained."
            )
        quantization = kwargs.pop("quantization_config")
    if quantization is not None:
        kinds = {target.type for target in targets}
        require_bitsandbytes("bitsandbytes weights", device_types=kinds)
    return quantization


def _dtype_alias(dtype: torch.dtype | str, kwargs: dict[str, Any]) -> torch.dtype | str:
    """``dtype``, or the caller's ``torch_dtype=`` (taken out of ``kwargs``) when it is "auto"."""
    alias = kwargs.pop("torch_dtype", None)
    if alias is None:
        return dtype
    if not (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        raise InvalidArgumentError(
            f"Both dtype={dtype!r} and torch_dtype={alias!r} were given. Pass one: dtype= "
            "(load_safely passes it under the name the installed transformers expects)."
        )
    given: torch.dtype | str = alias
    return given


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
    targets: list[torch.device],
    max_memory: Mapping[Any, int | str] | None,
    *,
    allow_offload: bool,
    device: DeviceLike,
) -> dict[DeviceLike, int]:
    """Free memory of each target (and the host, to offload to), capped by ``max_memory``."""
    import torch

    cpu = torch.device("cpu")
    devices = [*targets, *([cpu] if allow_offload and cpu not in targets else [])]
    budgets: dict[DeviceLike, int] = {}
    for target in devices:
        free = torch.cuda.mem_get_info(target)[0] if target.type == "cuda" else host_memory()
        budgets[str(target)] = int(free)
    used = ", ".join(map(str, budgets))
    for key, cap in (max_memory or {}).items():
        try:
            name = str(normalize_device(key))
        except DeviceUnavailableError as error:  # malformed keys raise their DeviceError
            if spreads(device):  # every device there is was asked for: the key is what is wrong
                raise
            raise InvalidArgumentError(
                f"max_memory names {key!r}, a device this machine lacks, and this load plans "
                f"for {used} only. Drop that entry, or choose the device with device=."
            ) from error
        if name == "cpu" and name not in budgets:
            continue  # accelerate-style max_memory names the cpu; nothing is offloaded here
        if name not in budgets:
            raise InvalidArgumentError(
                f"max_memory names {key!r}, which this load does not use (it plans for {used}). "
                "Drop that entry, or choose the device with device=."
            )
        budgets[name] = min(budgets[name], parse_size(cap, what=f"max_memory[{key!r}]"))
    return budgets


def skeleton_of(
    pretrained: str | os.PathLike[str], kwargs: Mapping[str, Any], model_class: type[Any] | None
) -> nn.Module:
    """The model ``from_pretrained(pretrained, **kwargs)`` builds, on ``meta`` (no weights)."""
    return _skeleton(*_config_and_class(pretrained, kwargs, model_class))


def _skeleton(config: Any, concrete: type[Any]) -> nn.Module:
    import torch

    return load_skeleton(config, model_class=concrete, dtype=torch.float32).model


def explicit_map(
    device_map: object,
    *,
    allow_offload: bool,
    device: DeviceLike = "auto",
    max_memory: object = None,
    model: nn.Module | None = None,
) -> dict[str, str]:
    """A caller's ``device_map`` for ``from_pretrained``: checked, in the one spelling of maps.

    With ``model`` (its skeleton), also checked against it: names, coverage and tied weights.

    Raises:
        InvalidArgumentError: Not a dict (strategy words are what planning replaces), given with
            ``device=``/``max_memory=``, offloading weights without ``allow_offload=True``, a
            name ``model`` lacks, or weights no entry places.
        DeviceError: A value that is not a device of this machine, or tied weights split.
    """
    if not isinstance(device_map, Mapping):
        raise InvalidArgumentError(
            f"device_map={device_map!r}: load_safely makes the device_map itself from its plan, "
            "and strategy words ('auto', 'balanced', ...) are what it replaces. Pass "
            "device='cuda:1' (or 'cpu', or 'auto' for every GPU) instead, or an explicit "
            "{module_name: device} dict to place modules yourself."
        )
    if not (device is None or device == "auto") or max_memory is not None:
        given = [f"device={device!r}"] if not (device is None or device == "auto") else []
        given += [f"max_memory={max_memory!r}"] if max_memory is not None else []
        raise InvalidArgumentError(
            f"An explicit device_map places every module itself, so {' and '.join(given)} "
            "have nothing to choose. Drop them, or drop device_map= and let load_safely plan."
        )
    normalized = normalize_map(device_map)
    if model is not None:
        check_map(model, normalized)
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


def _opens(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any failure to open means "broken" here
        return False


def _failed(
    error: BaseException,
    pretrained: str | os.PathLike[str],
    subfolder: object,
    folder: str | None,
    *,
    quantized: bool = False,
) -> BaseException | None:
    """Free what a failed load allocated; the omnifix error to raise, or ``None`` to re-raise."""
    import torch

    translated: BaseException | None = None
    if quantized and isinstance(error, ImportError) and not isinstance(error, OmnifixError):
        translated = QuantizationUnavailableError(
            f"transformers cannot load bitsandbytes weights here: {error} Fix: pip install -U "
            "bitsandbytes accelerate, or load without quantization."
        )
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        translated = InsufficientMemoryError(
            f"Loading {os.fspath(pretrained)!r} ran out of GPU memory although the plan said it "
            f"fits: {error}. Another process probably took memory after the plan measured it, "
            "or the checkpoint's weights are larger than its config says. Nothing stays loaded. "
            "Fix: free the GPU (or pass device= to use another one), or lower max_memory= for "
            "that GPU to leave room, then retry."
        )
    elif isinstance(error, (OSError, EOFError, json.JSONDecodeError, pickle.UnpicklingError)) or (
        type(error).__module__.startswith("safetensors")
    ):
        local = Path(pretrained) / str(subfolder)
        paths = sorted(local.glob("*.safetensors")) if local.is_dir() else []
        broken = [path.name for path in paths if not _opens(path)]
        files = f" Unreadable weight files: {', '.join(broken)}." if broken else ""
        translated = CheckpointError(
            f"Reading the weights of {os.fspath(pretrained)!r} failed: {type(error).__name__}: "
            f"{error}.{files} The checkpoint is incomplete or corrupt (an interrupted download "
            "or copy), or lacks weight files. Nothing stays loaded. Fix: download or copy the "
            "checkpoint again (huggingface-cli download <repo> --force-download for a Hub "
            "model), then retry."
        )
    # A traceback keeps every frame of from_pretrained alive, and with them the half-built
    # model; clearing their locals (executing frames are skipped) lets it go. Errors chained
    # inside transformers (a worker thread's, a re-raised one) carry frames too.
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        if chained.__traceback__ is not None:
            traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a no-op when this process never initialised CUDA
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return translated


def _allocator_and_check(kwargs: Mapping[str, Any], *, expandable: bool, verify: bool) -> None:
    """Refuse ``verify`` without a plan; turn expandable segments on before CUDA starts."""
    if verify and kwargs.get("device_map") is not None:
        raise InvalidArgumentError(
            "verify_workload=True compares measured peaks with a plan's budgets, and an explicit "
            "device_map has no plan. Drop device_map= (load_safely plans one), or drop "
            "verify_workload=True."
        )
    if expandable:  # before anything starts CUDA: torch reads its allocator settings once
        enable_expandable_segments()


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
    expandable_segments: bool = True,
    verify_workload: bool = False,
    accept_bound: bool = False,
    quantization: object = None,
    parallel: ParallelMode | None = None,
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
    expandable_segments: bool = True,
    verify_workload: bool = False,
    accept_bound: bool = False,
    quantization: object = None,
    parallel: ParallelMode | None = None,
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
    expandable_segments: bool = True,
    verify_workload: bool = False,
    accept_bound: bool = False,
    quantization: object = None,
    parallel: ParallelMode | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a transformers model where it fits, or refuse with numbers before loading anything.

    Plans with :func:`omnifix.plan_placement` (one GPU, else a split over the GPUs), then calls
    the real ``from_pretrained`` with the plan's explicit ``device_map``.

    Args:
        pretrained: A checkpoint directory (as ``save_pretrained`` writes it) or a Hub model id.
        model_class: A ``PreTrainedModel`` subclass or an Auto class such as
            ``AutoModelForCausalLM``; ``None``: the class the config's ``architectures`` names.
        device: ``"auto"`` (every visible GPU, else the cpu), ``"cuda"`` (every GPU),
            ``"cuda:1"`` or ``1`` (that GPU only), or ``"cpu"``.
        dtype: ``"auto"`` (bfloat16 on Ampere or newer GPUs, float16 on older ones, float32 on
            the cpu) or a dtype or its name, passed as ``dtype=`` or ``torch_dtype=`` as the
            installed transformers expects (``torch_dtype=`` is accepted as an alias).
        attn_implementation: ``"auto"`` (flash_attention_2 where it can run, else sdpa), a name,
            or (transformers 4.57+) a per-sub-config dict. One that cannot run here falls back
            to sdpa with an :class:`omnifix.OmnifixWarning`.
        max_memory: Caps on the measured budgets, e.g. ``{0: "20GiB", "cpu": "64GiB"}``.
        workload: What the model will be asked to do (:class:`omnifix.Workload`), which sizes
            the KV cache and activations; ``None``: the planner's default.
        allow_offload: Accept a plan that keeps weights on the cpu or disk behind accelerate
            hooks (with a temporary offload folder when none is given).
        expandable_segments: Start CUDA with the caching allocator's expandable segments
            (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` for this process), which leave
            0.3-0.9 % of the allocated peak reserved but unusable instead of 0.3-5 % (measured on
            one H200, 7-30B models), so more of each GPU holds the workload; the plan assumes
            it. Only where CUDA is not yet initialised and no allocator settings were given;
            otherwise the configuration in effect is planned for. ``False`` leaves it alone.
        verify_workload: After loading, run one greedy ``generate`` of ``workload`` (its prompt
            as token ids, media counted as that many tokens) and compare each GPU's measured
            reserved peak with its budget; a peak over budget raises before the first real
            request. Costs one request of that size (docs/planning.md has the figures); on the
            cpu the pass runs but no peak is compared. Needs a plan (no explicit ``device_map``).
        accept_bound: Where the memory model does not understand part of the model (the plan's
            notes say what, with the conservative bound used instead), load on that bound
            instead of refusing (as for :func:`omnifix.plan_placement`).
        strict: Raise instead of falling back when the requested attention cannot run.
        hooks: For a model split over several GPUs: ``"lean"`` (:func:`omnifix.lean_dispatch`,
            one light hook per ``device_map`` entry) or ``"accelerate"`` (its hook on every module
            with weights). Offloaded models keep accelerate's, which stream their weights.
        quantization: bitsandbytes weights, planned and loaded: ``"int8"``, ``"nf4"``,
            ``"fp4"`` or a ``transformers.BitsAndBytesConfig`` (as for
            :func:`omnifix.plan_placement`); the plan's ``BitsAndBytesConfig`` is passed to
            ``from_pretrained``. A ``BitsAndBytesConfig`` given as ``quantization_config=`` is
            planned the same way.
        parallel: ``"tensor"``: under ``torchrun``, load one slice of every layer per process
            through transformers' own tensor parallelism, after planning each rank's slice
            against its device (for a model that fits no single GPU of a host with several;
            docs/beyond-one-host.md). ``device``, ``max_memory``, ``allow_offload`` and a
            ``device_map`` do not apply. ``None``: the whole model in this process.
        **from_pretrained_kwargs: Forwarded to ``from_pretrained`` (``revision``, ``subfolder``,
            ``trust_remote_code``, ``quantization_config``, config overrides...). An explicit
            ``device_map`` dict is checked, not planned; a strategy word is refused.

    Returns:
        The model in eval mode, with no meta tensors (but offloaded ones with
        ``allow_offload=True``); split over devices, with ``hooks`` and its input embeddings
        pinned. :func:`omnifix.placement_report` tells where everything went.

    Raises:
        InsufficientMemoryError: The plan does not fit the budgets (need vs free per device, and
            options that would fit), loading ran out of GPU memory, or ``verify_workload``
            measured a peak over budget (``error.measured``).
        CheckpointError: The checkpoint is missing, unreadable, incomplete or corrupt.
        MetaTensorError: Weights ended up on ``meta`` (e.g. keys missing from the checkpoint).
        AttentionUnavailableError: ``strict=True`` and the attention cannot run here.
        UnsupportedModelError: No model class for the config, or an attention dict before 4.57.
        InvalidArgumentError: A bad dtype, attention, ``max_memory``, ``device_map``, ``hooks``
            or quantization.
        QuantizationUnavailableError: The quantization cannot load here (bitsandbytes missing,
            or without a backend for the device); the message names what to install.
        DeviceError: A device that is malformed, missing, or not a CUDA GPU or the cpu.
        DeviceCopyError: Copies between two GPUs of a split arrive changed (checked once per
            pair and process, before loading).

    Example:
        >>> import tempfile, omnifix
        >>> import omnifix.testing as ot
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     model = omnifix.load_safely(ot.save_tiny_model("qwen2", tmp), device="cpu")
        >>> model.dtype, model.config._attn_implementation, omnifix.placement_report(model).strategy
        (torch.float32, 'sdpa', 'single')
    """
    _require_arguments(
        pretrained, max_memory, hooks=hooks, allow_offload=allow_offload, strict=strict
    )
    kwargs = dict(from_pretrained_kwargs)
    if kwargs.pop("output_loading_info", False):
        raise InvalidArgumentError(
            "output_loading_info=True makes from_pretrained return a tuple, and load_safely "
            "returns the model. Drop it: missing or unexpected keys are still logged by "
            "transformers, and weights left without data are refused by assert_no_meta."
        )
    require_workload(workload)
    _allocator_and_check(kwargs, expandable=expandable_segments, verify=verify_workload)
    # 1. dtype: ours, or the caller's torch_dtype= (the pre-4.56 spelling) when ours is "auto".
    dtype = _dtype_alias(dtype, kwargs)
    user_map = kwargs.pop("device_map", None)

    # 2. What to load: config (not the weights) and class.
    config, concrete = _config_and_class(pretrained, kwargs, model_class)
    if parallel is not None:
        _check_parallel(parallel, user_map, device, max_memory, allow_offload=allow_offload)
        return load_tensor_parallel(
            pretrained,
            config=config,
            model_class=concrete,
            dtype=dtype,
            attn_implementation=attn_implementation,
            workload=workload,
            strict=strict,
            from_pretrained_kwargs=kwargs,
        )

    # 3. Where: an explicit caller's map, or a plan over the measured budgets.
    plan: PlacementPlan | None = None
    device_map: Mapping[str, object]
    if user_map is not None:
        device_map = explicit_map(
            user_map,
            allow_offload=allow_offload,
            device=device,
            max_memory=max_memory,
            model=_skeleton(config, concrete),  # checked against the model it will place
        )
        targets = [normalize_device(value) for value in device_map.values() if value != "disk"]
    else:
        targets = _targets(device)
    quantization = _quantization(quantization, kwargs, targets)
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
        # Every visible GPU, uncapped: the planner measures them, knowing the CUDA context is paid.
        measured = spreads(device) and max_memory is None
        budgets = (
            None
            if measured
            else _budgets(targets, max_memory, allow_offload=allow_offload, device=device)
        )
        plan = plan_placement(
            config,
            model_class=concrete,
            budgets=budgets,
            dtype=chosen_dtype,
            attn_implementation=planned_attention,
            workload=workload,
            allow_offload=allow_offload,
            quantization=quantization,
            accept_bound=accept_bound,
        )
        if not plan.fits and max_memory is not None:  # the caps refused it, maybe not the machine
            raise InsufficientMemoryError(
                f"{plan.explain()}\nThese budgets are capped by max_memory={dict(max_memory)!r}: "
                "raise those caps, or drop max_memory= to plan with the free memory.",
                plan=plan,
            )
        plan.raise_if_refused()  # InsufficientMemoryError: need vs free per device, and options
        device_map = dict(plan.device_map)
    if quantization is not None:  # the plan's config, or for the caller's own map one for it
        kwargs["quantization_config"] = (
            bnb_config(quantization, config, concrete, chosen_dtype)
            if plan is None
            else plan.quantization_config
        )

    # Copies between the GPUs of a split arrive intact (DeviceCopyError), before loading anything.
    check_copies(spell(value) for value in device_map.values())

    # 4. Load: the dtype under this transformers' keyword, an offload folder of ours if needed.
    folder = None
    if allow_offload and "disk" in device_map.values() and kwargs.get("offload_folder") is None:
        folder = kwargs["offload_folder"] = tempfile.mkdtemp(prefix="omnifix-offload-")
    kwargs[dtype_keyword()] = chosen_dtype
    kwargs["attn_implementation"] = attention
    before = baseline(plan) if verify_workload and plan is not None else None
    try:
        model: Any = concrete.from_pretrained(pretrained, device_map=device_map, **kwargs)
        # 5. Check: no weights left on meta (offloaded ones only when allowed).
        assert_no_meta(model, allow_offload=allow_offload)
    except BaseException as error:
        model = None
        subfolder = kwargs.get("subfolder", "")
        translated = _failed(
            error, pretrained, subfolder, folder, quantized=quantization is not None
        )
        if translated is None:
            raise
        raise translated from error
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
    model.eval()
    if isinstance(attn_implementation, str) and attn_implementation.strip().lower() != "auto":
        _warn_sub_models(model, str(attention))

    # 6. A model that spans several devices: lean hooks, pinned embeddings; remember the plan.
    # 7. With verify_workload: the declared workload, once, against each GPU's budget.
    _finish(model, plan, device_map, chosen_dtype, hooks, before=before)
    return model


def _check_parallel(
    parallel: object, user_map: object, device: object, max_memory: object, *, allow_offload: bool
) -> None:
    """Refuse ``parallel=`` values and the options a tensor-parallel load has no use for."""
    if parallel not in PARALLEL_MODES:
        raise InvalidArgumentError(
            f"parallel={parallel!r} is not a parallel mode. Pass parallel='tensor' (one slice of "
            "every layer per torchrun process), or None to load the whole model here.",
            argument="parallel",
            valid=PARALLEL_MODES,
        )
    given = [
        name
        for name, unused in (
            ("device_map", user_map is not None),
            ("device", device != "auto"),
            ("max_memory", max_memory is not None),
            ("allow_offload", allow_offload),
        )
        if unused
    ]
    if given:
        raise InvalidArgumentError(
            f"parallel='tensor' places each slice on its process's own device, so "
            f"{', '.join(given)} has nothing to choose. Drop {', '.join(given)}, or drop "
            "parallel= to plan one process's placement.",
            argument="parallel",
        )


def _warn_sub_models(model: nn.Module, attention: str) -> None:
    """Warn when transformers runs some sub-models with another implementation than asked for.

    transformers switches some towers silently (Qwen2.5-Omni's token2wav keeps sdpa when eager or
    flash attention is asked for); ``"auto"`` means "what each sub-model supports", so only a named
    request warns.
    """
    used = sub_model_attention(model)
    other = {name: value for name, value in used.items() if value != attention}
    if other:
        where = ", ".join(f"{name or 'the model'} with {value!r}" for name, value in other.items())
        warnings.warn(
            f"attn_implementation={attention!r} was asked for, but transformers runs {where} "
            f"(it does not use {attention!r} there). placement_report(model) shows each "
            "sub-model's attention. To silence this, pass attn_implementation='auto'.",
            OmnifixWarning,
            stacklevel=3,
        )


def _finish(
    model: nn.Module,
    plan: PlacementPlan | None,
    device_map: Mapping[str, object],
    dtype: torch.dtype,
    hooks: str,
    *,
    before: Baseline | None = None,
) -> None:
    """Lean hooks and pinned embeddings for a split model; the load's record; the check."""
    pinned: tuple[str, ...] = ()
    if len(execution_devices(model)) > 1:
        if hooks == "lean" and not Placement.of(device_map).offloads:
            try:
                lean_dispatch(model)
            # lean_dispatch checks everything before it changes anything: a refusal leaves
            # accelerate's hooks in place, which work, only slower. Say so, not fail the load.
            except OmnifixError as error:
                warnings.warn(
                    f"load_safely kept accelerate's hooks on this split model: {error} To "
                    'silence this, pass hooks="accelerate".',
                    OmnifixWarning,
                    stacklevel=3,
                )
        with contextlib.suppress(UnsupportedModelError):  # no token embedding: nothing to pin
            pinned = pin_embeddings(model).modules
    if plan is None:
        places = ", ".join(sorted({str(value) for value in device_map.values()}))
        record = LoadRecord("explicit", f"the caller's device_map over {places}", dtype, {}, pinned)
    else:
        predicted = {
            row.device: (row.total, None if row.unlimited else row.budget)
            for row in plan.devices
            if row.device in plan.devices_used
        }
        record = LoadRecord(plan.strategy, plan.reason, dtype, predicted, pinned)
    remember(model, record)
    if plan is not None and before is not None:
        run_workload(model, plan, plan.workload, before)
