"""One workload planned in every dtype and quantisation: ``omnifix plan --dtypes``.

float32, the GPUs' half type (bfloat16, float16 before compute capability 8.0), bitsandbytes
int8 and nf4: the weights and predicted peak of each device, and whether it fits, as one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from omnifix._plan.plan import plan_placement
from omnifix._stored import remembered
from omnifix._table import Block, Table, plain, rich
from omnifix._units import format_bytes

if TYPE_CHECKING:
    from rich.console import Group

    from omnifix._plan.plan import PlacementPlan

__all__ = ["DtypeTable", "dtype_table"]

#: The variants, as (label, dtype, quantization); "half" is the budgets' half type.
_VARIANTS: Final = (
    ("float32", "float32", None),
    ("half", "auto-half", None),
    ("int8", "auto-half", "int8"),
    ("nf4", "auto-half", "nf4"),
)


@dataclass(frozen=True)
class DtypeTable:
    """The plan of each dtype and quantisation, for one model, workload and set of budgets."""

    model: str
    plans: tuple[tuple[str, PlacementPlan], ...]

    def _blocks(self) -> list[Block]:
        rows = []
        for label, plan in self.plans:
            verdict = plan.strategy if plan.fits else "refused"
            used = [row for row in plan.devices if row.weights or row.total]
            for index, row in enumerate(used):
                budget = "unlimited" if row.unlimited else format_bytes(row.budget)
                rows.append(
                    (
                        label if index == 0 else "",
                        row.device,
                        format_bytes(row.weights),
                        format_bytes(row.total),
                        format_bytes(row.total + row.margin),
                        budget,
                        verdict if index == 0 else "",
                    )
                )
        return [
            f"{self.model} in each dtype, workload {self.plans[0][1].workload}",
            Table(
                ("dtype", "device", "weights", "peak", "with margin", "budget", "plan"),
                tuple(rows),
                style=lambda column, text: "red" if column == "plan" and text == "refused" else "",
            ),
        ]

    def __str__(self) -> str:
        """The table as plain text."""
        return plain(self._blocks())

    def __rich__(self) -> Group:
        """The table as a rich table."""
        return rich(self._blocks())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each variant's dtype, quantisation, strategy, and per-device bytes."""
        return {
            "model": self.model,
            "dtypes": [
                {
                    "label": label,
                    "dtype": str(plan.dtype).removeprefix("torch."),
                    "quantization": None if plan.quantization is None else label,
                    "strategy": plan.strategy,
                    "fits": plan.fits,
                    "devices": [
                        {
                            "device": row.device,
                            "weights": row.weights,
                            "peak": row.total,
                            "margin": row.margin,
                            "budget": row.budget,
                            "fits": row.fits,
                        }
                        for row in plan.devices
                    ],
                }
                for label, plan in self.plans
            ],
        }


def dtype_table(model: object, **plan_kwargs: Any) -> DtypeTable:
    """Plan ``model`` as :func:`omnifix.plan_placement` would, in every dtype and quantisation.

    ``plan_kwargs`` are ``plan_placement``'s (``dtype`` and ``quantization`` are set per row).
    The half type is bfloat16, or float16 where a budgeted GPU is older than compute capability
    8.0; on a cpu-only budget, bfloat16. Quantised rows are planned without offload.
    """
    import torch

    plan_kwargs = {k: v for k, v in plan_kwargs.items() if k not in ("dtype", "quantization")}
    with remembered():  # one read of the checkpoint's headers for every row
        half_plan = plan_placement(model, **plan_kwargs)
        half = half_plan.dtype if half_plan.dtype != torch.float32 else torch.bfloat16
        plans = []
        for label, dtype, quantization in _VARIANTS:
            kwargs = dict(plan_kwargs)
            if quantization is not None:
                kwargs["allow_offload"] = False
            chosen = half if dtype == "auto-half" else getattr(torch, dtype)
            plan = plan_placement(model, dtype=chosen, quantization=quantization, **kwargs)
            plans.append((str(chosen).removeprefix("torch.") if label == "half" else label, plan))
    return DtypeTable(half_plan.model, tuple(plans))
