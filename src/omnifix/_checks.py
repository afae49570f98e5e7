"""Checks of plain option values that several public functions share."""

from __future__ import annotations

from omnifix.errors import InvalidArgumentError

__all__ = ["require_flags"]


def require_flags(**flags: object) -> None:
    """Refuse a keyword option that should be ``True`` or ``False`` but is something else.

    ``allow_offload="no"`` is truthy: accepting it would do the opposite of what was meant.

    Example:
        >>> from omnifix._checks import require_flags
        >>> require_flags(strict=False)
        >>> require_flags(strict="no")
        Traceback (most recent call last):
        ...
        omnifix.errors.InvalidArgumentError: strict='no' is not True or False. Pass strict=True \
or strict=False.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidArgumentError(
                f"{name}={value!r} is not True or False. Pass {name}=True or {name}=False."
            )
