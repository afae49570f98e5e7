"""Memory sizes: reading them the way accelerate's ``max_memory`` does, and writing them."""

from __future__ import annotations

import contextlib
import math
from typing import Final

from omnifix.errors import InvalidArgumentError

__all__ = ["GIB", "MIB", "format_bytes", "parse_size"]

MIB: Final = 2**20
GIB: Final = 2**30
_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: float) -> str:
    """``25769803776`` -> ``"24.0 GiB"``: binary units, one decimal, whole bytes below a KiB.

    Example:
        >>> from omnifix._units import format_bytes
        >>> format_bytes(24 * 2**30), format_bytes(3.5 * 2**20), format_bytes(40)
        ('24.0 GiB', '3.5 MiB', '40 B')
        >>> format_bytes(-(2**30))
        '-1.0 GiB'
    """
    value = float(size)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:  # noqa: PLR2004 - a binary unit
            return f"{int(size)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover - the loop returns at its last unit


def parse_size(value: object, *, what: str) -> int:
    """Bytes from an int, a finite float or a size string such as ``"24GiB"`` or ``"80GB"``.

    Strings are read by accelerate's ``convert_file_size_to_int`` (the parser of ``max_memory``),
    so the same spellings work here and in ``from_pretrained``; ``what`` names the value in errors.

    Raises:
        InvalidArgumentError: Negative, not finite, not a number, or an unknown unit.

    Example:
        >>> from omnifix._units import parse_size
        >>> parse_size("24GiB", what="budget"), parse_size("1.5GB", what="budget")
        (25769803776, 1500000000)
    """
    from accelerate.utils import convert_file_size_to_int

    size: int | None = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError, OverflowError):  # "24" (no unit), "nanGiB", "infGB"
            size = int(convert_file_size_to_int(value.strip().replace(" ", "")))
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, float) and math.isfinite(value):
        size = int(value)
    if size is None or size < 0:
        number = value.strip() if isinstance(value, str) else ""
        fix = (
            f"A string needs a unit: pass {int(number)} (an int counts bytes) or e.g. "
            f"'{number}GiB'."
            if number.isdecimal()
            else "Pass a number of bytes (>= 0) or a string with a unit, such as '24GiB' or '80GB'."
        )
        raise InvalidArgumentError(f"{what}={value!r} is not a memory size. {fix}")
    return size
