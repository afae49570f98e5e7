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
from omnifix._embeddings import EmbeddingPin as EmbeddingPin
from omnifix._embeddings import pin_embeddings as pin_embeddings
from omnifix._meta import MetaReport as MetaReport
from omnifix._meta import MetaTensor as MetaTensor
from omnifix._meta import assert_no_meta as assert_no_meta
from omnifix._meta import find_meta_tensors as find_meta_tensors
from omnifix._types import DeviceLike as DeviceLike
from omnifix._types import DeviceMapValue as DeviceMapValue
from omnifix._types import DeviceRequest as DeviceRequest
from omnifix._version import __version__ as __version__
from omnifix.errors import DeviceError as DeviceError
from omnifix.errors import DeviceUnavailableError as DeviceUnavailableError
from omnifix.errors import InsufficientMemoryError as InsufficientMemoryError
from omnifix.errors import InvalidArgumentError as InvalidArgumentError
from omnifix.errors import MetaTensorError as MetaTensorError
from omnifix.errors import OmnifixError as OmnifixError
from omnifix.errors import OmnifixWarning as OmnifixWarning
from omnifix.errors import UnsupportedModelError as UnsupportedModelError

__all__ = [
    "DeviceError",
    "DeviceLike",
    "DeviceMapValue",
    "DeviceRequest",
    "DeviceUnavailableError",
    "EmbeddingPin",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MetaReport",
    "MetaTensor",
    "MetaTensorError",
    "OmnifixError",
    "OmnifixWarning",
    "ResolvedDevice",
    "UnsupportedModelError",
    "__version__",
    "assert_no_meta",
    "find_meta_tensors",
    "input_device",
    "normalize_device",
    "pin_embeddings",
    "resolve_device_map",
]
