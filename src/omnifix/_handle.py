"""The one protocol of everything omnifix changes that can be undone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omnifix._compat import deprecated

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["Handle"]


class Handle:
    """A change omnifix made (hooks, a pin, a patch) and its undo.

    Leaving a ``with`` block of the handle removes it, whether or not the block raised; dropping
    it without ``remove()`` leaves the change in place, like torch's own hook handles.

    Example:
        >>> import torch, omnifix
        >>> embedding = torch.nn.Embedding(4, 2)
        >>> with omnifix.pin_embeddings(embedding) as pin:
        ...     pin.active
        True
        >>> pin.active, pin.remove(), pin.active  # removing twice does nothing
        (False, None, False)
    """

    __slots__ = ("_active",)

    def __init__(self) -> None:
        """An active handle; subclasses make their change before or after calling this."""
        self._active = True

    @property
    def active(self) -> bool:
        """Whether the change is still in place (``False`` once removed)."""
        return self._active

    def remove(self) -> None:
        """Undo the change; does nothing when already removed."""
        if not self._active:
            return
        self._active = False
        self._undo()

    def _undo(self) -> None:
        """Undo the change (called once, by :meth:`remove`)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Deprecated name of :meth:`remove`."""
        deprecated(f"{type(self).__name__}.restore()", "remove()")
        self.remove()

    def __enter__(self) -> Self:
        """The handle itself; the change is already in place."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the change, whether or not the block raised."""
        self.remove()
