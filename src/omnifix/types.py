"""Types for annotating code that uses omnifix.

The aliases of its arguments, and the classes of what its functions return that you do not
construct yourself.

>>> import omnifix
>>> from omnifix.types import ResolvedDevice
>>> isinstance(omnifix.resolve_device_map("cpu"), ResolvedDevice)
True
"""

from omnifix._devices import ResolvedDevice as ResolvedDevice
from omnifix._dispatch import LeanDispatch as LeanDispatch
from omnifix._embeddings import EmbeddingPin as EmbeddingPin
from omnifix._handle import Handle as Handle
from omnifix._meta import MetaTensor as MetaTensor
from omnifix._patch import FromPretrainedPatch as FromPretrainedPatch
from omnifix._plan import DeviceBudget as DeviceBudget
from omnifix._plan import EngineLaunch as EngineLaunch
from omnifix._plan import ParallelLayout as ParallelLayout
from omnifix._plan import PlanOption as PlanOption
from omnifix._report import DeviceUsage as DeviceUsage
from omnifix._types import AttentionRequest as AttentionRequest
from omnifix._types import DeviceLike as DeviceLike
from omnifix._types import DeviceMapValue as DeviceMapValue
from omnifix._types import DeviceRequest as DeviceRequest
from omnifix._types import OffloadLocation as OffloadLocation

__all__ = [
    "AttentionRequest",
    "DeviceBudget",
    "DeviceLike",
    "DeviceMapValue",
    "DeviceRequest",
    "DeviceUsage",
    "EmbeddingPin",
    "EngineLaunch",
    "FromPretrainedPatch",
    "Handle",
    "LeanDispatch",
    "MetaTensor",
    "OffloadLocation",
    "ParallelLayout",
    "PlanOption",
    "ResolvedDevice",
]
