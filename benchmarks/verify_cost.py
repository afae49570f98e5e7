"""What ``load_safely(..., verify_workload=True)`` costs: the load with and without the check.

    PYTHONPATH=src python benchmarks/verify_cost.py --out benchmarks/results/verify-cost-cpu.json

On the cpu, with the tiny models of ``omnifix.testing`` (a few MB): each workload is loaded
``--rounds`` times without the check and with it, interleaved, and the median wall time of each
and their difference are recorded. The check is one greedy ``generate`` of the workload, so on a
GPU it costs what one request of that size costs; the tiny figures show the fixed part (building
the inputs, the generate call's own overhead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_results

import omnifix
import omnifix.testing as ot

WORKLOADS = {
    "text-64+8": omnifix.Workload(text_tokens=64, max_new_tokens=8),
    "text-512+32": omnifix.Workload(text_tokens=512, max_new_tokens=32),
    "batch4-256+16": omnifix.Workload(batch_size=4, text_tokens=256, max_new_tokens=16),
}


def _load(path: Path, work: omnifix.Workload, *, verify: bool) -> float:
    start = time.perf_counter()
    omnifix.load_safely(path, device="cpu", workload=work, verify_workload=verify)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Measure every workload; write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/verify-cost-cpu.json"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--family", default="qwen2")
    args = parser.parse_args(argv)
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = ot.save_tiny_model(args.family, tmp)
        _load(path, WORKLOADS["text-64+8"], verify=True)  # warm-up: imports, first generate
        for name, work in WORKLOADS.items():
            plain, checked = [], []
            for _ in range(args.rounds):
                plain.append(_load(path, work, verify=False))
                checked.append(_load(path, work, verify=True))
            case = {
                "family": args.family,
                "workload": name,
                "description": str(work),
                "rounds": args.rounds,
                "load_s": round(statistics.median(plain), 4),
                "load_and_verify_s": round(statistics.median(checked), 4),
                "verify_s": round(statistics.median(checked) - statistics.median(plain), 4),
            }
            cases.append(case)
            print(case, flush=True)
            write_results(args.out, "verify_cost", __doc__ or "", cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
