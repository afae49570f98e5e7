"""The post-load check: one dummy pass of the declared workload, each GPU's peak against its budget.

``load_safely(..., verify_workload=True)`` calls :func:`verify_workload` right after loading, so a
plan that was wrong fails here, with the measured numbers, not at the caller's first request.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omnifix._plan.budgets import outside_allocator
from omnifix._units import format_bytes
from omnifix.errors import InsufficientMemoryError, OmnifixWarning

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from omnifix._plan import PlacementPlan, Workload

__all__ = ["Baseline", "baseline", "verify_workload"]

_FIX = (
    "Fix: load with a smaller workload or larger budgets (the measured peaks show how much more "
    "each device needs), e.g. load_safely(..., workload=Workload(text_tokens=...)) with fewer "
    "tokens or batch_size."
)


@dataclass(frozen=True)
class Baseline:
    """What each budgeted GPU's caching allocator held before the model was loaded (bytes)."""

    reserved: Mapping[str, int]


def baseline(plan: PlacementPlan) -> Baseline:
    """Each budgeted GPU's reserved bytes now: the load and the pass are measured above it."""
    import torch

    reserved = {}
    if torch.cuda.is_available():
        for row in plan.devices:
            if row.device.startswith("cuda:"):
                reserved[row.device] = int(torch.cuda.memory_reserved(row.device))
    return Baseline(reserved)


def _inputs(model: nn.Module, workload: Workload, device: torch.device) -> dict[str, Any]:
    """Token ids of the workload's whole prompt (media counted as text tokens) and a mask."""
    import torch

    config: Any = getattr(model, "config", None)
    text: Any = config.get_text_config() if config is not None else None
    vocab = int(getattr(text, "vocab_size", 0) or 2)
    shape = (workload.batch_size, workload.prompt_tokens)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, vocab - 1), shape, generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def verify_workload(
    model: nn.Module, plan: PlacementPlan, workload: Workload, before: Baseline
) -> dict[str, int]:
    """Run one greedy ``generate`` of ``workload`` and compare each GPU's peak with its budget.

    The prompt holds the workload's tokens as text (images, video and audio counted as that many
    tokens: the language model's prefill and KV cache are sized, the towers are not run). On a
    GPU the peak is what the caching allocator reserved (``max_memory_reserved``) above what it
    held before loading, plus what the plan counts outside the allocator (the CUDA context where
    the budget was not measured free memory). On the cpu there is no allocator peak to read:
    the pass runs, so a failure surfaces now, but nothing is compared.

    Returns:
        ``{device: measured peak}`` of each budgeted GPU (empty without CUDA).

    Raises:
        InsufficientMemoryError: A GPU's measured peak exceeds its budget, or the pass ran out of
            memory; with ``error.plan`` and ``error.measured`` (``{device: bytes}``).
    """
    import torch

    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        warnings.warn(
            f"verify_workload skipped: {type(model).__name__} takes "
            f"{model.main_input_name!r}, not token ids, so no dummy pass was run. Check the "
            "first real request's peak with torch.cuda.max_memory_reserved() instead.",
            OmnifixWarning,
            stacklevel=3,
        )
        return {}
    gpus = list(before.reserved)
    for device in gpus:
        torch.cuda.reset_peak_memory_stats(device)
    inputs = _inputs(model, workload, plan.input_device or torch.device("cpu"))
    generate: Any = model.generate
    try:
        with torch.inference_mode():
            generate(
                **inputs,
                max_new_tokens=workload.max_new_tokens,
                min_new_tokens=workload.max_new_tokens,
                do_sample=False,
            )
        failure = None
    except torch.cuda.OutOfMemoryError as out_of_memory:
        failure = out_of_memory
    measured = {}
    for row in plan.devices:
        if row.device in before.reserved:
            peak = int(torch.cuda.max_memory_reserved(row.device)) - before.reserved[row.device]
            measured[row.device] = peak + outside_allocator(row)
    over = {d: peak for d, peak in measured.items() if peak > plan.device(d).budget}
    if failure is None and not over:
        return measured
    lines = [
        f"  {d}: measured peak {format_bytes(peak)} (predicted {format_bytes(plan.device(d).total)}"
        f" + margin {format_bytes(plan.device(d).margin)}), budget "
        f"{format_bytes(plan.device(d).budget)}"
        for d, peak in measured.items()
    ]
    what = "ran out of memory" if failure is not None else "exceeded its budget"
    refused = InsufficientMemoryError(
        "\n".join(
            [
                f"The post-load check of {plan.model} ({workload}) {what}:",
                *lines,
                _FIX,
            ]
        ),
        plan=plan,
        measured=measured,
    )
    if failure is not None:
        raise refused from failure
    raise refused
