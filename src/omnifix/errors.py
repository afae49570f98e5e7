"""The errors and warnings omnifix raises (docs/errors.md says when, and what to do).

Every error derives from :class:`OmnifixError` and from the builtin a caller would catch
without knowing omnifix, so wrapping existing code never breaks its ``except`` clauses.

>>> import omnifix
>>> try:
...     omnifix.normalize_device("cdua")
... except ValueError as error:  # a DeviceError is a ValueError too
...     print(type(error).__name__)
DeviceError
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omnifix._meta import MetaReport
    from omnifix._plan import PlacementPlan

__all__ = [
    "AttentionUnavailableError",
    "CheckpointError",
    "DeviceCopyError",
    "DeviceError",
    "DeviceUnavailableError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MetaTensorError",
    "OmnifixDeprecationWarning",
    "OmnifixError",
    "OmnifixWarning",
    "QuantizationUnavailableError",
    "UnsupportedModelError",
]

# Errors with data take it as keyword arguments: BaseException pickles ``args`` (the message)
# and the instance ``__dict__`` (the data), so copies and pickles keep both.


class OmnifixError(Exception):
    """Root of every error omnifix raises; catch it to handle all of them."""


class InvalidArgumentError(OmnifixError, ValueError):
    """An argument has a value omnifix cannot use (a negative batch size, say).

    Attributes:
        argument: The argument's name, where one argument is at fault (``"tensor_parallel"``).
        valid: The values that would work, where omnifix knows them (``(1, 2, 4)``).
    """

    def __init__(self, message: str, *, argument: str = "", valid: tuple[object, ...] = ()) -> None:
        """The message, and the argument at fault with the values that would work."""
        super().__init__(message)
        self.argument = argument
        self.valid = valid


class DeviceError(InvalidArgumentError):
    """A device was named wrongly, or a device_map word was used where a device is needed."""


class DeviceUnavailableError(DeviceError):
    """The device is well formed but this machine lacks it (``"cuda:7"`` with 2 GPUs, say).

    Attributes:
        requested: What was asked for, as given (``"cuda:7"``, ``7``).
        available: The devices this process can use, best first (``("cuda:0", "cpu")``).
    """

    def __init__(
        self, message: str, *, requested: object = None, available: tuple[str, ...] = ()
    ) -> None:
        """The message, what was asked for and what there is."""
        super().__init__(message)
        self.requested = requested
        self.available = available


class MetaTensorError(OmnifixError, RuntimeError):
    """Parameters or buffers are on the ``meta`` device: offloaded behind hooks, or never loaded.

    Attributes:
        report: The :class:`omnifix.MetaReport` of the model (every meta tensor, classified);
            ``None`` where no model was searched (a module that says nothing about its device).
    """

    def __init__(self, message: str, *, report: MetaReport | None = None) -> None:
        """The message and the report."""
        super().__init__(message)
        self.report = report


# MemoryError first: its own ``__new__`` must be the class's, or pickling that rebuilds the error
# with ``cls.__new__(cls)`` (tblib's, which Xinference's xoscar installs) raises TypeError.
class InsufficientMemoryError(MemoryError, OmnifixError):
    """The model and its workload do not fit the memory of the devices it may use.

    Attributes:
        plan: The refused :class:`omnifix.PlacementPlan` (need per device, ``plan.options``);
            ``None`` when loading itself ran out of memory after a plan that fit.
        measured: ``{device: bytes}`` peaks measured by ``load_safely(verify_workload=True)``'s
            dummy pass; empty when nothing was measured.
    """

    def __init__(
        self,
        message: str,
        *,
        plan: PlacementPlan | None = None,
        measured: dict[str, int] | None = None,
    ) -> None:
        """The message, the refused plan and any measured peaks."""
        super().__init__(message)
        self.plan = plan
        self.measured: dict[str, int] = dict(measured or {})


class DeviceCopyError(OmnifixError, RuntimeError):
    """Copies between two GPUs arrive changed: a model split over them would compute garbage.

    Attributes:
        source: The device the copy left, such as ``"cuda:0"``.
        target: The device it arrived on wrong, such as ``"cuda:1"``.
        differing: How many of the test tensor's values arrived changed.
    """

    def __init__(
        self, message: str, *, source: str = "", target: str = "", differing: int = 0
    ) -> None:
        """The message, the pair of devices and how many values differed."""
        super().__init__(message)
        self.source = source
        self.target = target
        self.differing = differing


class UnsupportedModelError(OmnifixError, TypeError):
    """The model, or the installed transformers, lacks what the operation needs."""


class AttentionUnavailableError(UnsupportedModelError, ImportError):
    """The requested attention implementation cannot run here (raised with ``strict=True``).

    Also an ``ImportError``, which is what transformers raises for a missing flash-attn, so code
    that caught that keeps working.
    """


class QuantizationUnavailableError(UnsupportedModelError, ImportError):
    """The quantisation asked for cannot load here; the message names what to install.

    bitsandbytes is missing or broken, or has no backend for the device.

    Also an ``ImportError``, which is what transformers raises for a missing bitsandbytes.
    """


class CheckpointError(OmnifixError, OSError):
    """The checkpoint is missing, unreadable, incomplete or corrupt.

    Also an ``OSError``, which is what transformers raises for a missing directory or file.
    """


class OmnifixWarning(UserWarning):
    """Something worked, but not the way you asked; the message says how to get what you asked."""


class OmnifixDeprecationWarning(OmnifixWarning, DeprecationWarning):
    """A name or argument that moved; the message gives the new spelling. Gone in the next 0.x."""
