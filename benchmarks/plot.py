"""Draw the PNGs of docs/benchmarks.md from the JSON files in benchmarks/results/.

    pip install "omnifix[bench]"      # matplotlib
    python benchmarks/plot.py         # writes docs/img/benchmark-*.png

Reads only the results files (never runs a model); a suite whose file is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


#: Figures are 7 inches wide at this resolution (the accuracy plot, with its long case names, 9.5):
#: about the width of a documentation page, so their 8-9 point labels stay legible there.
DPI = 100


def accuracy(data: dict[str, Any], out: Path) -> None:
    """Per-GPU relative error of omnifix's prediction and of the two anchors, case by case."""
    import matplotlib.pyplot as plt

    labels, rows = [], []
    for case in data["cases"]:
        for device, gpu in case.get("gpus", {}).items():
            if case.get("status") != "ok" or gpu.get("error") is None:
                continue
            labels.append(f"{case['case']} {device}")
            rows.append((gpu["error"], gpu["weights_kv_error"], gpu["weights_only_error"]))
    fig, ax = plt.subplots(figsize=(9.5, 0.3 * len(rows) + 1.5))
    positions = range(len(rows))
    for column, (name, marker) in enumerate(
        (("omnifix", "o"), ("weights + KV (hf-mem)", "s"), ("weights only (accelerate)", "^"))
    ):
        ax.scatter([100 * r[column] for r in rows], positions, marker=marker, label=name, s=24)
    ax.axvline(0, color="black", linewidth=0.8)
    for bound in (-10, 10):
        ax.axvline(bound, color="grey", linewidth=0.6, linestyle="--")
    ax.set_yticks(list(positions), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("(predicted - measured) / measured peak, % per GPU")
    ax.set_title("Peak memory prediction, runs that completed")
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def capacity(data: dict[str, Any], out: Path) -> None:
    """Largest input that ran, per input kind and placement, relative to device_map="auto"."""
    import matplotlib.pyplot as plt

    summary = data.get("summary", {})
    kinds = list(summary)
    placements = ("auto", "balanced", "balanced_low_0", "omnifix")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.2
    for index, placement in enumerate(placements):
        values = []
        for kind in kinds:
            caps = summary[kind]  # {"unit": ..., "auto": n, ..., "omnifix_over_auto": r}
            auto, value = caps.get("auto"), caps.get(placement)
            values.append(value / auto if value and auto else 0)
        ax.bar(
            [k + (index - 1.5) * width for k in range(len(kinds))], values, width, label=placement
        )
    ax.axhline(1.5, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(len(kinds)), [f"{k}\n({summary[k].get('unit', '')})" for k in kinds])
    ax.set_ylabel('largest input / "auto"')
    ax.set_title("Capacity on two GPUs capped at 24 GiB (dashed: 1.5x goal)")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


#: Short names of benchmarks/overhead.py's configurations, for the axis.
SHORT = {
    "a": "1 GPU\nno hooks",
    "b": "1 GPU\naccelerate",
    "c": "1 GPU\nomnifix",
    "d": "2 GPUs\nbalanced\naccelerate",
    "e": "2 GPUs\nplan\naccelerate",
    "f": "2 GPUs\nplan\nomnifix lean",
    "g": "2 GPUs\nbalanced\nomnifix lean",
}


def overhead(data: dict[str, Any], out: Path) -> None:
    """Decode ms/token of each configuration relative to one GPU without hooks."""
    import matplotlib.pyplot as plt

    families = sorted({case["family"] for case in data["cases"]})
    configs = sorted({case["config"] for case in data["cases"]})
    fig, ax = plt.subplots(figsize=(7, 4.4))
    width = 0.8 / len(families)
    for index, family in enumerate(families):
        ratios = {
            case["config"]: case.get("ratio_to_a") or 0
            for case in data["cases"]
            if case["family"] == family
        }
        ax.bar(
            [c + (index - (len(families) - 1) / 2) * width for c in range(len(configs))],
            [ratios.get(config, 0) for config in configs],
            width,
            label=family,
        )
    for target in (1.01, 1.05):
        ax.axhline(target, color="grey", linewidth=0.6, linestyle="--")
    ax.set_ylim(0.8, max(1.6, ax.get_ylim()[1]))
    ax.set_xticks(range(len(configs)), [f"{c}\n{SHORT.get(c, '')}" for c in configs], fontsize=8)
    ax.set_ylabel("ms/token / (one GPU, no hooks)")
    ax.set_title("Per-token decode cost of device hooks (dashed: 1.01x and 1.05x goals)")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def attention(data: dict[str, Any], out: Path) -> None:
    """Prefill ms, decode ms/token and peak above the weights per case, for each implementation."""
    import matplotlib.pyplot as plt

    cases = [case for case in data["cases"] if "attention" in case]
    keys = list(dict.fromkeys((c["model"], c["batch"], c["prompt_tokens"]) for c in cases))
    names = list(dict.fromkeys(c["attention"] for c in cases))
    found = {(c["model"], c["batch"], c["prompt_tokens"], c["attention"]): c for c in cases}
    metrics = (
        ("prefill_ms", "prefill (ms)", 1.0),
        ("decode_ms_per_token", "decode (ms/token)", 1.0),
        ("peak_bytes", "peak above weights (GiB)", 2**-30),
    )
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 8.5), sharex=True)
    width = 0.8 / len(names)
    for ax, (field, label, scale) in zip(axes, metrics, strict=True):
        for index, name in enumerate(names):
            values = []
            for key in keys:
                case = found.get((*key, name), {})
                ok = case.get("status") == "ok" and case.get(field) is not None
                values.append(case[field] * scale if ok else 0)
            offset = (index - (len(names) - 1) / 2) * width
            ax.bar([k + offset for k in range(len(keys))], values, width, label=name)
        ax.set_ylabel(label, fontsize=8)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8, ncol=len(names))
    axes[0].set_title("Attention implementations on one GPU (a missing bar: out of memory)")
    ticks = [f"{model}\n{batch} x {prompt}" for model, batch, prompt in keys]
    axes[-1].set_xticks(range(len(keys)), ticks, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


#: Each suite's drawing and the machine its results file was measured on.
SUITES = {
    "accuracy": (accuracy, "h200x2-tf5.17"),
    "capacity": (capacity, "h200x2-tf5.17"),
    "overhead": (overhead, "h200x2-tf5.17"),
    "attention": (attention, "h200-tf5.17"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machine", default=None, help="results file suffix, for every suite")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    for suite, (draw, machine) in SUITES.items():
        data = _load(f"{suite}-{args.machine or machine}.json")
        if data is None:
            print(f"{suite}: no results file, skipped")
            continue
        out = IMAGES / f"benchmark-{suite}.png"
        draw(data, out)
        print(f"{suite}: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
