"""omnifix: make Hugging Face multimodal models land on the right devices.

Importing omnifix is cheap: torch, transformers and accelerate are imported by the functions
that need them, not here.

>>> import omnifix
>>> omnifix.normalize_device("cpu")
device(type='cpu')
"""

from omnifix._devices import ResolvedDevice as ResolvedDevice
from omnifix._devices import input_device as input_device
from omnifix._devices import normalize_device as normalize_device
from omnifix._devices import resolve_device_map as resolve_device_map
from omnifix._dispatch import LeanDispatch as LeanDispatch
from omnifix._dispatch import lean_dispatch as lean_dispatch
from omnifix._embeddings import EmbeddingPin as EmbeddingPin
from omnifix._embeddings import pin_embeddings as pin_embeddings
from omnifix._load import AttentionRequest as AttentionRequest
from omnifix._load import DeviceUsage as DeviceUsage
from omnifix._load import PlacementReport as PlacementReport
from omnifix._load import load_safely as load_safely
from omnifix._load import placement_report as placement_report
from omnifix._meta import MetaReport as MetaReport
from omnifix._meta import MetaTensor as MetaTensor
from omnifix._meta import assert_no_meta as assert_no_meta
from omnifix._meta import find_meta_tensors as find_meta_tensors
from omnifix._patch import Patch as Patch
from omnifix._patch import install as install
from omnifix._patch import patched as patched
from omnifix._patch import uninstall as uninstall
from omnifix._plan import DeviceBudget as DeviceBudget
from omnifix._plan import PlacementPlan as PlacementPlan
from omnifix._plan import Workload as Workload
from omnifix._plan import plan_placement as plan_placement
from omnifix._types import DeviceLike as DeviceLike
from omnifix._types import DeviceMapValue as DeviceMapValue
from omnifix._types import DeviceRequest as DeviceRequest
from omnifix._version import __version__ as __version__
from omnifix.errors import AttentionUnavailableError as AttentionUnavailableError
from omnifix.errors import CheckpointError as CheckpointError
from omnifix.errors import DeviceError as DeviceError
from omnifix.errors import DeviceUnavailableError as DeviceUnavailableError
from omnifix.errors import InsufficientMemoryError as InsufficientMemoryError
from omnifix.errors import InvalidArgumentError as InvalidArgumentError
from omnifix.errors import MetaTensorError as MetaTensorError
from omnifix.errors import OmnifixError as OmnifixError
from omnifix.errors import OmnifixWarning as OmnifixWarning
from omnifix.errors import UnsupportedModelError as UnsupportedModelError

__all__ = [
    "AttentionRequest",
    "AttentionUnavailableError",
    "CheckpointError",
    "DeviceBudget",
    "DeviceError",
    "DeviceLike",
    "DeviceMapValue",
    "DeviceRequest",
    "DeviceUnavailableError",
    "DeviceUsage",
    "EmbeddingPin",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "LeanDispatch",
    "MetaReport",
    "MetaTensor",
    "MetaTensorError",
    "OmnifixError",
    "OmnifixWarning",
    "Patch",
    "PlacementPlan",
    "PlacementReport",
    "ResolvedDevice",
    "UnsupportedModelError",
    "Workload",
    "__version__",
    "assert_no_meta",
    "find_meta_tensors",
    "input_device",
    "install",
    "lean_dispatch",
    "load_safely",
    "normalize_device",
    "patched",
    "pin_embeddings",
    "placement_report",
    "plan_placement",
    "resolve_device_map",
    "uninstall",
]
