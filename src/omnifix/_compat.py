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
    "DTYPE_KEYWORD",
    "NEWEST_TESTED",
    "PACKED_ATTENTION_SPLITS",
    "QWEN2_5_OMNI",
    "QWEN2_5_VL",
    "ROPE_PARAMETERS",
    "UNCAST_LOGITS",
    "attention_dict_supported",
    "deprecated",
    "dtype_keyword",
    "installed_version",
    "no_init_weights",
    "placement_module",
    "quiet",
    "requirements",
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
