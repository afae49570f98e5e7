"""Python source for the planner's proposals: the call to paste to get the same plan again.

Sources name ``omnifix``, ``torch`` and ``transformers`` by module (``torch.bfloat16``,
``transformers.BitsAndBytesConfig(...)``), so ``import omnifix, torch, transformers`` is all a
pasted line needs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omnifix._units import GIB, MIB

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch

    from omnifix._plan.budgets import Budget
    from omnifix._plan.workload import Workload

__all__ = ["Call", "budgets_source", "call_of", "dtype_source", "size_source", "workload_source"]


@dataclass(frozen=True)
class Call:
    """How ``plan_placement`` was called, as source.

    Attributes:
        model: The first argument: a path, preset or Hub id as a string literal, else the name
            ``config`` or ``model`` for a config or a built model passed as an object.
        model_class: ``model_class=`` as source, if it was given.
        budgets_given: Whether ``budgets=`` was given (else the planner measured this machine).
        hub: Where to read the config (``revision=``, ``trust_remote_code=``), as source.
    """

    model: str = "model"
    model_class: str | None = None
    budgets_given: bool = True
    hub: tuple[tuple[str, str], ...] = ()

    def source(self, arguments: Mapping[str, str], function: str = "plan_placement") -> str:
        """``omnifix.plan_placement('qwen2-vl-7b', budgets={...}, ...)`` with ``arguments``."""
        parts = [self.model]
        if self.model_class is not None:
            parts.append(f"model_class={self.model_class}")
        parts += [f"{key}={value}" for key, value in arguments.items()]
        parts += [f"{key}={value}" for key, value in self.hub]
        return f"omnifix.{function}({', '.join(parts)})"


def call_of(model: object, model_class: type | None, hub: Mapping[str, object]) -> Call:
    """The :class:`Call` of ``plan_placement(model, model_class=..., **hub)``."""
    from transformers import PretrainedConfig

    if isinstance(model, (str, os.PathLike)):
        first = repr(os.fspath(model))
    else:
        first = "config" if isinstance(model, PretrainedConfig) else "model"
    cls = None
    if model_class is not None:
        import transformers

        name = model_class.__name__
        cls = f"transformers.{name}" if getattr(transformers, name, None) is model_class else name
    given = tuple((key, repr(value)) for key, value in hub.items() if key != "token" and value)
    return Call(first, cls, hub=given)


def size_source(size: int) -> str:
    """``'24GiB'``, ``'512MiB'`` where exact, else the bytes (``25769803777``)."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB")):
        if size and size % unit == 0:
            return f"'{size // unit}{name}'"
    return str(size)


def budgets_source(budgets: Sequence[Budget]) -> str:
    """``{'cuda:0': '24GiB', 'cpu': '64GiB'}``."""
    return "{" + ", ".join(f"{b.device!r}: {size_source(b.size)}" for b in budgets) + "}"


def dtype_source(dtype: torch.dtype) -> str:
    """``torch.bfloat16``."""
    return f"torch.{str(dtype).removeprefix('torch.')}"


def workload_source(workload: Workload) -> str:
    """``omnifix.Workload(text_tokens=2048)``: the fields that differ from the defaults."""
    changed = [
        f"{field.name}={getattr(workload, field.name)!r}"
        for field in dataclasses.fields(workload)
        if field.init and getattr(workload, field.name) != field.default
    ]
    return f"omnifix.Workload({', '.join(changed)})"
