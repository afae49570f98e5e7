"""Turn the bug-zoo records that ``scripts/gpu.sh`` writes (zoo-*.jsonl) into a Markdown table.

python scripts/zoo_table.py gpu-results/zoo-*.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(paths: list[str]) -> None:
    """Print the table of every record in ``paths``."""
    rows = [
        json.loads(line)
        for path in paths
        for line in Path(path).read_text(encoding="utf-8").splitlines()
    ]
    rows.sort(key=lambda row: (row["case"], row["transformers"]))
    print("| case | stack | before | after |")
    print("|---|---|---|---|")
    for row in rows:
        flash = row.get("flash_attn", "not installed")
        stack = (
            f"transformers {row['transformers']}, accelerate {row['accelerate']}, "
            f"torch {row['torch']}, {'' if flash == 'not installed' else f'flash-attn {flash}, '}"
            f"{row['gpus']}"
        )
        extra = "".join(
            f"<br>{key.replace('_', ' ')}: `{_cell(value)}`"
            for key, value in row.items()
            if key
            not in {
                "test",
                "case",
                "before",
                "after",
                "transformers",
                "accelerate",
                "torch",
                "gpus",
                "flash_attn",
            }
        )
        before = f"`{_cell(row['before'])}`" if row["before"] else "(no failure to show)"
        print(f"| {_cell(row['case'])} | {stack} | {before} | {_cell(row['after'])}{extra} |")


if __name__ == "__main__":
    main(sys.argv[1:])
