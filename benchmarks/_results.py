"""What every benchmark suite records besides its cases: the machine, the versions, the method.

Each suite writes one JSON file::

    {"suite": "accuracy", "machine": {...}, "method": "...", "cases": [...], "summary": {...}}

``machine`` comes from :func:`environment` (GPU names and totals, CUDA context size, versions of
torch/transformers/accelerate/omnifix, CPU count); ``benchmarks/plot.py`` and
``docs/benchmarks.md`` read these files and nothing else. A case that fails records
:func:`error_status` as its status.
"""

from __future__ import annotations

import json
import os
import platform
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["environment", "error_status", "write_results"]


def environment() -> dict[str, Any]:
    """The machine and software a suite ran on (GPUs only where CUDA is available)."""
    import accelerate
    import torch
    import transformers

    import omnifix

    machine: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "omnifix": omnifix.__version__,
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            machine["gpus"].append(
                {"index": index, "name": props.name, "total_bytes": props.total_memory}
            )
    return machine


def write_results(
    path: Path,
    suite: str,
    method: str,
    cases: list[dict[str, Any]],
    *,
    summary: dict[str, Any] | None = None,
) -> None:
    """Write (or rewrite, so a run cut short keeps what it measured) one suite's results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "machine": environment(), "method": method, "cases": cases}
    if summary is not None:
        payload["summary"] = summary
    path.write_text(json.dumps(payload, indent=1) + "\n")


def error_status(error: BaseException) -> str:
    """A recorded status for a failed case: ``oom: ...`` or ``error: Type: first line``."""
    import torch

    lines = str(error).strip().splitlines() or [""]
    if isinstance(error, torch.OutOfMemoryError):
        return f"oom: {lines[0][:300]}"
    return f"error: {type(error).__name__}: {lines[0][:300]}"
