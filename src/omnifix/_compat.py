"""The installed stack: versions, the releases where behaviour changed, and feature switches.

Every "which release is this" question omnifix asks is answered here, so a new transformers
release that moves something is one edit in one file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from omnifix.errors import OmnifixDeprecationWarning

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager

    from packaging.specifiers import SpecifierSet

__all__ = [
    "AUDIO_PLACEHOLDERS_EXPANDED",
    "AUTO_DTYPE_DEFAULT",
    "BNB_EXACT_LINEAR",
    "DTYPE_KEYWORD",
    "NEWEST_TESTED",
    "PACKED_ATTENTION_SPLITS",
    "QWEN2_5_OMNI",
    "QWEN2_5_VL",
    "ROPE_PARAMETERS",
    "SLIDING_WINDOW_CACHE",
    "UNCAST_LOGITS",
    "attention_dict_supported",
    "bnb_converts",
    "bnb_default_skips",
    "deprecated",
    "dtype_keyword",
    "installed_version",
    "no_init_weights",
    "placement_module",
    "quiet",
    "requirements",
    "tensor_parallel_keyword",
    "transformers_at_least",
    "transformers_version",
    "untested_versions",
]

#: ``from_pretrained(dtype=...)``; earlier releases only know ``torch_dtype=`` (renamed in
#: huggingface/transformers#39782; the old name logs a deprecation from here on).
DTYPE_KEYWORD: Final = Version("4.56")
#: Logits stay in the model dtype; 4.45 upcast every forward's logits to float32.
UNCAST_LOGITS: Final = Version("4.46")
#: Attention over packed sequences (a forward that takes ``cu_seqlens``: the Qwen vision and
#: audio towers) runs one segment at a time; earlier releases build one block-diagonal mask over
#: the whole call. Measured on the installed wheels of 4.45 to 5.23.
PACKED_ATTENTION_SPLITS: Final = Version("4.54")
#: ``generate``'s ``DynamicCache`` keeps only the last ``sliding_window`` tokens of each
#: sliding-window layer (per-layer cache classes); earlier releases keep every token in every
#: layer. Checked on the installed wheels of 4.45 (no such layer class) and 4.57.
SLIDING_WINDOW_CACHE: Final = Version("4.56")
#: ``from_pretrained`` loads in the checkpoint's dtype by default (earlier: torch's default), and
#: configs spell rotary settings as ``rope_parameters`` (earlier: ``rope_scaling``/``rope_theta``).
AUTO_DTYPE_DEFAULT: Final = Version("5.0")
ROPE_PARAMETERS: Final = AUTO_DTYPE_DEFAULT
#: Qwen2-Audio's processor writes one placeholder per audio token (earlier: one per audio, which
#: the model expanded itself).
AUDIO_PLACEHOLDERS_EXPANDED: Final = Version("4.48")
#: The first releases that ship Qwen2.5-VL and Qwen2.5-Omni.
QWEN2_5_VL: Final = Version("4.49")
QWEN2_5_OMNI: Final = Version("4.52")
#: bitsandbytes replaces exactly ``nn.Linear`` (not its subclasses) and GPT-2's ``Conv1D``, and
#: matches skip patterns from the start of a name, as a regex or as a suffix
#: (``should_convert_module``); earlier releases replace subclasses of ``nn.Linear`` too and
#: match ``pattern + "."`` anywhere in a name, or the whole name.
BNB_EXACT_LINEAR: Final = Version("5.0")

#: The newest release lines of transformers and accelerate the whole test suite passed on. The
#: test suite's newest stack installs the newest releases whenever it is built; ``omnifix doctor``
#: warns about an installed release past these lines. Raise them once every stack passes.
NEWEST_TESTED: Final = {"transformers": Version("5.24"), "accelerate": Version("1.16")}


def installed_version(distribution: str) -> Version | None:
    """The installed version of ``distribution``; ``None`` if it is not installed or unreadable."""
    try:
        return Version(importlib.metadata.version(distribution))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def untested_versions() -> dict[str, Version]:
    """The installed transformers/accelerate releases past :data:`NEWEST_TESTED`'s lines.

    Example:
        >>> from packaging.version import Version
        >>> from omnifix._compat import NEWEST_TESTED, untested_versions
        >>> all(version > NEWEST_TESTED[name] for name, version in untested_versions().items())
        True
    """
    found: dict[str, Version] = {}
    for name, tested in NEWEST_TESTED.items():
        version = installed_version(name)
        if version is not None and version.release[:2] > tested.release[:2]:
            found[name] = version
    return found


@functools.cache
def transformers_version() -> Version:
    """The installed transformers release, without pre/dev/local parts (``5.0.0rc1`` -> 5.0.0)."""
    import transformers

    return Version(Version(transformers.__version__).base_version)


def transformers_at_least(release: Version) -> bool:
    """Whether the installed transformers is ``release`` or newer."""
    return transformers_version() >= release


def dtype_keyword() -> Literal["dtype", "torch_dtype"]:
    """The ``from_pretrained`` keyword for the dtype in the installed transformers."""
    return "dtype" if transformers_at_least(DTYPE_KEYWORD) else "torch_dtype"


def requirements() -> dict[str, SpecifierSet]:
    """What omnifix's own metadata requires of each dependency (extras left out)."""
    try:
        declared = importlib.metadata.requires("omnifix") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return {}
    found: dict[str, SpecifierSet] = {}
    for line in declared:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # pragma: no cover - our own metadata is well formed
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found[requirement.name] = requirement.specifier
    return found


def placement_module() -> Any | None:
    """Transformers 5.x's own sizing and placement (``transformers.integrations.accelerate``).

    ``None`` where transformers calls accelerate's ``compute_module_sizes`` and
    ``infer_auto_device_map`` itself (4.x).
    """
    try:
        module = importlib.import_module("transformers.integrations.accelerate")
    except ImportError:  # 4.45 has no such module
        return None
    return module if hasattr(module, "infer_auto_device_map") else None


def no_init_weights() -> AbstractContextManager[Any]:
    """The switch ``from_pretrained`` uses to skip random initialisation (it moved in 5.0)."""
    try:
        module = importlib.import_module("transformers.initialization")  # 5.x
    except ImportError:
        module = importlib.import_module("transformers.modeling_utils")  # 4.x
    context: AbstractContextManager[Any] = module.no_init_weights()
    return context


def bnb_default_skips(model: Any) -> list[str]:
    """The modules transformers' bitsandbytes quantizer keeps by default.

    Those it keeps when ``llm_int8_skip_modules`` is ``None``: tied and output embeddings and
    the last module (``get_keys_to_not_convert``).
    """
    try:
        module = importlib.import_module("transformers.quantizers.base")  # 5.x
        keys = module.get_keys_to_not_convert
    except (ImportError, AttributeError):
        keys = importlib.import_module("transformers.integrations").get_keys_to_not_convert
    return [str(key) for key in keys(model)]


def bnb_converts(name: str, module: Any, patterns: list[str]) -> bool:
    """Whether transformers' ``replace_with_bnb_linear`` replaces ``module`` (named ``name``).

    ``patterns`` are the modules it does not convert (skip modules and fp32 modules).
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if transformers_at_least(BNB_EXACT_LINEAR):
        if not (type(module) is nn.Linear or isinstance(module, Conv1D)):
            return False
        rule = importlib.import_module("transformers.quantizers.quantizers_utils")
        return bool(rule.should_convert_module(name, patterns))
    if not isinstance(module, (nn.Linear, Conv1D)) or name in patterns:
        return False
    return not any(f"{key}." in name or key == name for key in patterns)


@functools.cache
def attention_dict_supported() -> bool:
    """Whether configs take a per-sub-config dict of attention implementations (4.57+)."""
    from transformers import PretrainedConfig

    probe = PretrainedConfig()
    try:
        probe._attn_implementation = {"": "eager"}  # noqa: SLF001 - the setter asked about
    except (TypeError, ValueError, AttributeError):
        return False
    return getattr(probe, "_attn_implementation", None) == "eager"


@functools.cache
def tensor_parallel_keyword() -> Literal["distributed_config", "tp_plan"] | None:
    """How ``from_pretrained`` takes tensor parallelism in the installed transformers.

    ``"distributed_config"`` where ``transformers.DistributedConfig`` takes a ``tp_plan`` (5.x,
    where ``tp_plan=`` is deprecated), ``"tp_plan"`` where configs carry a ``base_model_tp_plan``
    (4.50 to 4.57), ``None`` where neither exists (4.45).
    """
    import inspect

    import transformers

    distributed = getattr(transformers, "DistributedConfig", None)
    if distributed is not None and "tp_plan" in inspect.signature(distributed).parameters:
        return "distributed_config"
    if hasattr(transformers.PretrainedConfig, "base_model_tp_plan"):
        return "tp_plan"
    return None


@contextmanager
def quiet() -> Iterator[None]:
    """Hold transformers' and accelerate's logging at ERROR, and accelerate's warnings.

    Planning logs what every load of a config logs (rope notices, vocabulary checks) and gets
    warned that its simulated GPUs do not exist; the plan says what matters itself.
    """
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"accelerate\.")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` moved to ``new`` (:class:`omnifix.errors.OmnifixDeprecationWarning`)."""
    warnings.warn(
        f"{old} is deprecated and goes in the next 0.x release: use {new}.",
        OmnifixDeprecationWarning,
        stacklevel=stacklevel,
    )
