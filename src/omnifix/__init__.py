"""omnifix: make Hugging Face models land on the right devices.

Plan before loading, never run out of memory at a budget the plan accepted, never degrade
silently. ``import omnifix`` is cheap: torch, transformers and accelerate are imported by the
functions that need them. Types for annotations are in :mod:`omnifix.types`, the errors also in
:mod:`omnifix.errors`.

>>> import omnifix
>>> omnifix.normalize_device("cpu")
device(type='cpu')
"""

from typing import Any

from omnifix import types as types  # omnifix.types.X after a plain ``import omnifix``
from omnifix._compat import deprecated
from omnifix._devices import input_device as input_device
from omnifix._devices import normalize_device as normalize_device
from omnifix._devices import resolve_device_map as resolve_device_map
from omnifix._dispatch import lean_dispatch as lean_dispatch
from omnifix._embeddings import pin_embeddings as pin_embeddings
from omnifix._load import load_safely as load_safely
from omnifix._meta import MetaReport as MetaReport
from omnifix._meta import assert_no_meta as assert_no_meta
from omnifix._meta import find_meta_tensors as find_meta_tensors
from omnifix._patch import patch_from_pretrained as patch_from_pretrained
from omnifix._plan import PlacementPlan as PlacementPlan
from omnifix._plan import Workload as Workload
from omnifix._plan import plan_placement as plan_placement
from omnifix._report import PlacementReport as PlacementReport
from omnifix._report import placement_report as placement_report
from omnifix._version import __version__ as __version__
from omnifix.errors import AttentionUnavailableError as AttentionUnavailableError
from omnifix.errors import CheckpointError as CheckpointError
from omnifix.errors import DeviceCopyError as DeviceCopyError
from omnifix.errors import DeviceError as DeviceError
from omnifix.errors import DeviceUnavailableError as DeviceUnavailableError
from omnifix.errors import InsufficientMemoryError as InsufficientMemoryError
from omnifix.errors import InvalidArgumentError as InvalidArgumentError
from omnifix.errors import MetaTensorError as MetaTensorError
from omnifix.errors import OmnifixError as OmnifixError
from omnifix.errors import OmnifixWarning as OmnifixWarning
from omnifix.errors import QuantizationUnavailableError as QuantizationUnavailableError
from omnifix.errors import UnsupportedModelError as UnsupportedModelError

__all__ = [
    "AttentionUnavailableError",
    "CheckpointError",
    "DeviceCopyError",
    "DeviceError",
    "DeviceUnavailableError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MetaReport",
    "MetaTensorError",
    "OmnifixError",
    "OmnifixWarning",
    "PlacementPlan",
    "PlacementReport",
    "QuantizationUnavailableError",
    "UnsupportedModelError",
    "Workload",
    "__version__",
    "assert_no_meta",
    "find_meta_tensors",
    "input_device",
    "lean_dispatch",
    "load_safely",
    "normalize_device",
    "patch_from_pretrained",
    "pin_embeddings",
    "placement_report",
    "plan_placement",
    "resolve_device_map",
]

#: Names that moved, one more release: ``old name -> (module, new name, how to spell it now)``.
_MOVED = {
    **{
        name: ("omnifix.types", name, f"omnifix.types.{name}")
        for name in [
            "AttentionRequest",
            "DeviceBudget",
            "DeviceLike",
            "DeviceMapValue",
            "DeviceRequest",
            "DeviceUsage",
            "EmbeddingPin",
            "Handle",
            "LeanDispatch",
            "MetaTensor",
            "ResolvedDevice",
        ]
    },
    "Patch": ("omnifix.types", "FromPretrainedPatch", "omnifix.types.FromPretrainedPatch"),
    # These three warn when called (their replacements differ in shape: see the CHANGELOG).
    "install": ("omnifix._patch", "install", ""),
    "uninstall": ("omnifix._patch", "uninstall", ""),
    "patched": ("omnifix._patch", "patched", ""),
}


def __getattr__(name: str) -> Any:
    """The deprecated names of :data:`_MOVED`, with a warning where they are looked up."""
    if name not in _MOVED:
        raise AttributeError(f"module 'omnifix' has no attribute {name!r}")
    import importlib

    module, new, spelling = _MOVED[name]
    if spelling:
        deprecated(f"omnifix.{name}", spelling)
    return getattr(importlib.import_module(module), new)
