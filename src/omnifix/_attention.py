"""Choosing the dtype and the attention implementation for the devices a model will use.

Each choice is a function of the machine's facts, passed as arguments, so it is testable without
the machine; docs/loading.md says what ``"auto"`` picks and how a backend falls back.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from omnifix._compat import attention_dict_supported
from omnifix.errors import (
    AttentionUnavailableError,
    InvalidArgumentError,
    OmnifixWarning,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    import torch

    from omnifix._types import AttentionRequest

__all__ = [
    "AMPERE",
    "HOPPER",
    "IMPLEMENTATIONS",
    "Capability",
    "choose_attention",
    "choose_attention_for",
    "choose_dtype",
    "gpu_capabilities",
    "installed_attention",
    "parse_dtype",
    "supported_attention",
]

#: A CUDA compute capability, ``(major, minor)``: ``(8, 0)`` for an A100, ``(9, 0)`` for an H100.
Capability = tuple[int, int]

#: The first compute capability with bfloat16 and FlashAttention-2 (Ampere).
AMPERE: Final[Capability] = (8, 0)
#: The first compute capability FlashAttention-3 and -4 run on (Hopper).
HOPPER: Final[Capability] = (9, 0)

#: The names :func:`parse_dtype` takes for each dtype weights load in.
_DTYPE_NAMES: Final = {
    "bfloat16": ("bfloat16", "bf16"),
    "float16": ("float16", "fp16", "half"),
    "float32": ("float32", "fp32", "float"),
}

#: Implementations omnifix knows, with transformers' availability probe (in ``transformers.utils``)
#: and the class flags that say a model supports them (4.45 spells flash ``_supports_flash_attn_2``,
#: 4.5x+ ``_supports_flash_attn``).
IMPLEMENTATIONS: Final[dict[str, tuple[str | None, tuple[str, ...]]]] = {
    "eager": (None, ()),
    "sdpa": (None, ("_supports_sdpa",)),
    "flash_attention_2": (
        "is_flash_attn_2_available",
        ("_supports_flash_attn_2", "_supports_flash_attn"),
    ),
    "flash_attention_3": (
        "is_flash_attn_3_available",
        ("_supports_flash_attn_3", "_supports_flash_attn"),
    ),
    "flash_attention_4": ("is_flash_attn_4_available", ("_supports_flash_attn",)),
    "flex_attention": ("is_torch_flex_attn_available", ("_supports_flex_attn",)),
}
_FLASH: Final = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype | None:
    """The floating dtype ``dtype`` names (``"bf16"``, ``"half"``, a dtype...), None for auto.

    Raises:
        InvalidArgumentError: Not a floating dtype or a known name.

    Example:
        >>> from omnifix._attention import parse_dtype
        >>> parse_dtype("BF16"), parse_dtype("torch.float32"), parse_dtype("auto")
        (torch.bfloat16, torch.float32, None)
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidArgumentError(
                f"dtype={dtype} is not a floating dtype: model weights load as bfloat16, float16 "
                "or float32 (quantised loading goes through quantization_config=). Pass one of "
                "those, or 'auto'."
            )
        return dtype
    if isinstance(dtype, str):
        text = dtype.strip().lower().removeprefix("torch.")
        if text == "auto":
            return None
        for name, spellings in _DTYPE_NAMES.items():
            if text in spellings:
                parsed: torch.dtype = getattr(torch, name)
                return parsed
    known = [spelling for spellings in _DTYPE_NAMES.values() for spelling in spellings]
    close = difflib.get_close_matches(str(dtype).lower(), [*known, "auto"], n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise InvalidArgumentError(
        f"dtype={dtype!r} is not a dtype omnifix loads models in. {hint}Pass 'auto', "
        "torch.bfloat16, torch.float16 or torch.float32 (or their names)."
    )


def choose_dtype(
    dtype: torch.dtype | str = "auto", *, capabilities: Sequence[Capability] = ()
) -> torch.dtype:
    """The dtype asked for (:func:`parse_dtype`), or for ``"auto"`` the best the GPUs support.

    ``"auto"`` is bfloat16 when every GPU in ``capabilities`` is Ampere (8.0) or newer, float16
    when one is older, float32 on the cpu (no capabilities).

    Example:
        >>> from omnifix._attention import choose_dtype
        >>> choose_dtype(capabilities=[(9, 0), (8, 6)]), choose_dtype(capabilities=[(8, 0), (7, 5)])
        (torch.bfloat16, torch.float16)
        >>> choose_dtype(), choose_dtype("fp16")
        (torch.float32, torch.float16)
    """
    import torch

    parsed = parse_dtype(dtype)
    if parsed is not None:
        return parsed
    if not capabilities:
        return torch.float32
    return torch.bfloat16 if min(capabilities) >= AMPERE else torch.float16


def gpu_capabilities(devices: Iterable[torch.device]) -> tuple[Capability, ...]:
    """The compute capability of each CUDA device in ``devices`` (others are skipped)."""
    import torch

    found = (
        torch.cuda.get_device_capability(device) for device in devices if device.type == "cuda"
    )
    return tuple((int(major), int(minor)) for major, minor in found)


def installed_attention() -> frozenset[str]:
    """The attention implementations this process can run, by transformers' probes.

    ``eager`` and ``sdpa`` always; the others when the installed transformers has their
    ``is_*_available`` probe and it says yes (the flash probes also need a visible CUDA GPU).
    """
    utils = importlib.import_module("transformers.utils")
    found = {"eager", "sdpa"}
    for name, (probe, _) in IMPLEMENTATIONS.items():
        check = getattr(utils, probe, None) if probe is not None else None
        if callable(check) and check():
            found.add(name)
    return frozenset(found)


def supported_attention(model_class: type) -> frozenset[str]:
    """The attention implementations ``model_class`` declares support for (its ``_supports_*``).

    Composite models (Qwen2.5-Omni, Qwen2-VL on 4.52+) check each sub-model again at load time;
    this reads the class that is loaded. ``eager`` is always included.
    """
    found = {"eager"}
    for name, (_, flags) in IMPLEMENTATIONS.items():
        values = [getattr(model_class, flag, False) for flag in flags]
        # A property (Qwen2-Audio on 4.45 asks its language model) only answers on an instance;
        # count it as support and let transformers check at load time.
        if any(value is True or isinstance(value, property) for value in values):
            found.add(name)
    return frozenset(found)


def _why_not(
    name: str,
    *,
    dtype: torch.dtype,
    capabilities: Sequence[Capability],
    installed: Collection[str],
    supported: Collection[str],
) -> str | None:
    """Every reason why ``name`` cannot run here, joined; ``None`` when it can."""
    import torch

    reasons = []
    if name not in supported:
        reasons.append("the model class does not support it")
    if name in _FLASH:
        needed = AMPERE if name == "flash_attention_2" else HOPPER
        if not capabilities:
            reasons.append("flash attention runs on CUDA GPUs only, and the model goes to the cpu")
        elif min(capabilities) < needed:
            worst = min(capabilities)
            reasons.append(
                f"it needs GPUs of compute capability {needed[0]}.{needed[1]} or newer, and one "
                f"has {worst[0]}.{worst[1]}"
            )
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"it runs in float16 or bfloat16 only, and the model loads in {dtype}")
    if name not in installed:
        package = {
            "flash_attention_2": "the flash-attn package",
            "flash_attention_3": "FlashAttention-3 (flash_attn_interface)",
            "flash_attention_4": "the flash-attn-4 package",
            "flex_attention": "flex attention",
        }.get(name, name)
        reasons.append(
            f"{package} is not available in this process (not installed, no CUDA GPU, or not "
            "supported by this transformers)"
        )
    return "; and ".join(reasons) if reasons else None


def choose_attention(
    requested: str = "auto",
    *,
    dtype: torch.dtype,
    capabilities: Sequence[Capability] = (),
    model_class: type | None = None,
    installed: Collection[str] | None = None,
    strict: bool = False,
    stacklevel: int = 2,
) -> str:
    """The attention implementation to load with, given the devices, dtype and model.

    ``"auto"`` gives ``"flash_attention_2"`` when it can run (a half dtype, Ampere GPUs in
    ``capabilities``, flash-attn in ``installed`` — default: :func:`installed_attention` — and
    ``model_class``'s ``_supports_*`` flags), else ``"sdpa"`` (``"eager"`` for a model without
    it). A named implementation is kept when it can run, else the same fallback comes with an
    :class:`omnifix.OmnifixWarning` saying why (``stacklevel`` as for :func:`warnings.warn`).
    Hub kernels (``"org/repo"``) and ``"paged|..."`` names pass through untouched.

    Raises:
        AttentionUnavailableError: ``strict=True`` and ``requested`` cannot run here.
        InvalidArgumentError: ``requested`` is not an attention implementation.

    Example:
        >>> import torch
        >>> from omnifix._attention import choose_attention
        >>> everything = {"eager", "sdpa", "flash_attention_2"}
        >>> choose_attention(dtype=torch.bfloat16, capabilities=[(9, 0)], installed=everything)
        'flash_attention_2'
        >>> choose_attention(dtype=torch.float32, capabilities=[(9, 0)], installed=everything)
        'sdpa'
        >>> choose_attention(dtype=torch.float32)  # the cpu
        'sdpa'
    """
    given: object = requested  # callers without a type checker may pass anything
    name = given.strip().lower() if isinstance(given, str) else ""
    # Hub kernels (org/repo) and paged variants: transformers resolves them itself.
    if "/" in name or name.startswith("paged|") or name.endswith("_paged"):
        return requested
    if name != "auto" and name not in IMPLEMENTATIONS:
        close = difflib.get_close_matches(name, [*IMPLEMENTATIONS, "auto"], n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise InvalidArgumentError(
            f"attn_implementation={requested!r} is not an attention implementation. {hint}Pass "
            f"'auto' or one of {', '.join(repr(known) for known in IMPLEMENTATIONS)}."
        )
    ready = installed_attention() if installed is None else installed
    supported = IMPLEMENTATIONS.keys() if model_class is None else supported_attention(model_class)
    fallback = "sdpa" if "sdpa" in supported else "eager"
    candidate = "flash_attention_2" if name == "auto" else name
    reason = _why_not(
        candidate, dtype=dtype, capabilities=capabilities, installed=ready, supported=supported
    )
    if reason is None:
        return candidate
    if name == "auto":
        return fallback
    owner = "" if model_class is None else f" for {model_class.__name__}"
    if strict:
        raise AttentionUnavailableError(
            f"attn_implementation={name!r} cannot run{owner} here: {reason}. Install what it "
            f"needs, or pass attn_implementation={fallback!r} (or 'auto', or strict=False to fall "
            f"back to {fallback!r} with a warning)."
        )
    warnings.warn(
        f"attn_implementation={name!r} cannot run{owner} here: {reason}; loading with "
        f"{fallback!r} instead. To get {name!r}, install what it needs; to silence this, pass "
        f"attn_implementation={fallback!r} (or 'auto').",
        OmnifixWarning,
        stacklevel=stacklevel,
    )
    return fallback


def choose_attention_for(
    requested: AttentionRequest,
    *,
    config: Any,
    dtype: torch.dtype,
    capabilities: Sequence[Capability],
    model_class: type[Any],
    strict: bool,
) -> tuple[AttentionRequest, str]:
    """What to pass as ``attn_implementation``, and the implementation to plan memory for.

    ``requested`` is one name, or a per-sub-config dict (transformers 4.57+) whose keys must be
    sub-configs of ``config`` and whose most memory-hungry leaf is the one planned for. The
    class's ``_supports_*`` flags are the top model's, so they do not limit a dict's leaves: each
    sub-model checks its own at load time.

    Raises:
        UnsupportedModelError: A dict on a transformers that takes one name only (before 4.57).
        InvalidArgumentError: A dict key that is no sub-config of ``config``.
    """
    if not isinstance(requested, Mapping):
        # stacklevel 4: choose_attention <- here <- load_safely <- the caller.
        chosen = choose_attention(
            requested,
            dtype=dtype,
            capabilities=capabilities,
            model_class=model_class,
            strict=strict,
            stacklevel=4,
        )
        return chosen, chosen
    if not attention_dict_supported():
        import transformers

        raise UnsupportedModelError(
            f"attn_implementation={dict(requested)!r}: transformers {transformers.__version__} "
            "applies one implementation to the whole model and does not take a per-sub-config "
            "dict. Pass one name (e.g. 'sdpa'), or upgrade transformers to 4.57 or newer."
        )
    leaves: list[str] = []

    def choose(
        request: Mapping[str, AttentionRequest], owner: Any, depth: int
    ) -> dict[str, AttentionRequest]:
        sub_configs = getattr(owner, "sub_configs", None) or {}
        chosen: dict[str, AttentionRequest] = {}
        for key, value in request.items():
            if key and key not in sub_configs:
                valid = ", ".join(repr(name) for name in ["", *sub_configs])
                raise InvalidArgumentError(
                    f"attn_implementation has the key {key!r}, which is no sub-config of "
                    f"{type(owner).__name__}, so transformers would ignore it. Use one of {valid} "
                    "('' is the model itself)."
                )
            if isinstance(value, Mapping):
                chosen[key] = choose(value, getattr(owner, key, None), depth + 1)
                continue
            # choose_attention <- choose (depth frames) <- here <- load_safely <- the caller.
            leaf = choose_attention(
                value, dtype=dtype, capabilities=capabilities, strict=strict, stacklevel=depth + 4
            )
            leaves.append(leaf)
            chosen[key] = leaf
        return chosen

    chosen_map = choose(requested, config, 1)
    order = ("eager", "flex_attention", "sdpa")  # the most memory-hungry first
    planned = next((name for name in order if name in leaves), leaves[0] if leaves else "sdpa")
    return chosen_map, planned
