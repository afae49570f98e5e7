"""The errors and warnings omnifix raises.

Every error derives from :class:`OmnifixError`, and also from the builtin that a caller
would catch without knowing omnifix (``ValueError`` for a bad device string,
``MemoryError`` for a plan that does not fit, ...), so wrapping existing code with omnifix
never breaks its ``except`` clauses. Every message says what was wrong and ends with the fix.

>>> import omnifix
>>> try:
...     omnifix.normalize_device("cdua")
... except ValueError as error:  # a DeviceError is a ValueError too
...     print(type(error).__name__)
DeviceError
"""

from __future__ import annotations

__all__ = [
    "AttentionUnavailableError",
    "CheckpointError",
    "DeviceError",
    "DeviceUnavailableError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MetaTensorError",
    "OmnifixError",
    "OmnifixWarning",
    "UnsupportedModelError",
]


class OmnifixError(Exception):
    """Root of every error omnifix raises; catch it to handle all of them."""


class InvalidArgumentError(OmnifixError, ValueError):
    """An argument has a value omnifix cannot use (a negative batch size, say)."""


class DeviceError(InvalidArgumentError):
    """A device was named wrongly, or a device_map word was used where a device is needed."""


class DeviceUnavailableError(DeviceError):
    """The device is well formed but this machine lacks it (``"cuda:7"`` with 2 GPUs, say)."""


class MetaTensorError(OmnifixError, RuntimeError):
    """Parameters or buffers are on the ``meta`` device: offloaded behind hooks, or never loaded."""


class InsufficientMemoryError(OmnifixError, MemoryError):
    """The model and its workload do not fit the memory of the devices it may use."""


class UnsupportedModelError(OmnifixError, TypeError):
    """The model, or the installed transformers, lacks what the operation needs."""


class AttentionUnavailableError(UnsupportedModelError, ImportError):
    """The requested attention implementation cannot run here (raised with ``strict=True``).

    Also an ``ImportError``, which is what transformers raises for a missing flash-attn, so code
    that caught that keeps working.
    """


class CheckpointError(OmnifixError, OSError):
    """The checkpoint is missing, unreadable, incomplete or corrupt.

    Also an ``OSError``, which is what transformers raises for a missing directory or file.
    """


class OmnifixWarning(UserWarning):
    """Something worked, but not the way you asked; the message says how to get what you asked."""
