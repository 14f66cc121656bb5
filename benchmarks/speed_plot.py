"""Issue 10's CPU rows as one figure: each variant's ratio to its anchor, beside the target.

    python -m benchmarks.speed_plot benchmarks/results/speed_2026-11-27.json -o benchmarks/results/speed.png

Reads what ``benchmarks.speed --parts compress,load,decode --json`` wrote; draws nothing it did not
measure (a part missing from the file is left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.sweep import figure, save_figure

# part -> (title, the ratio's key, target, True where lower is better)
PANELS = {
    "compress": ("whole compress command / I/O floor", "ratio_to_floor", 1.5, True),
    "load": ("load + first forward / dense from_pretrained", "ratio_to_dense", 1.0, True),
    "decode": ("batch-1 decode tokens/s / dense", "ratio_to_dense", 1.5, False),
}


def plot(result: dict, out: Path) -> Path:
    parts = [p for p in PANELS if p in result]
    fig, axes = figure(len(parts))
    for ax, part in zip(axes[0], parts, strict=True):
        title, key, target, lower = PANELS[part]
        rows = {name: row[key] for name, row in result[part].items() if isinstance(row, dict) and key in row}
        names, ratios = [_short(n) for n in rows], list(rows.values())
        met = ["tab:green" if (r <= target if lower else r >= target) else "tab:red" for r in ratios[1:]]
        bars = ax.barh(names, ratios, color=["tab:gray", *met])  # the first row is the anchor
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        ax.axvline(target, color="tab:blue", ls="--", lw=1.2)
        ax.set_xlim(0, max(*ratios, target) * 1.18)
        ax.invert_yaxis()
        ax.set_title(f"{title}\n(target {'≤' if lower else '≥'} {target}: dashed; green met, red missed)", fontsize=9)
        ax.set_xlabel("ratio to the anchor (gray)")
        ax.grid(axis="x", alpha=0.3)
    threads = result.get("threads")
    fig.suptitle(
        f"SmolLM2-135M, budget {result.get('budget')}, {threads} thread{'s' * (threads != 1)}, {result.get('date')}"
    )
    return save_figure(fig, out)


def _short(name: str) -> str:
    name = name.replace("svdlora compress", "compress").replace(" (from_pretrained + save_pretrained)", "")
    return name.replace(" (defaults: --svd exact, pivoted factors)", " (defaults)").replace(" (factor pairs)", "")


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="a benchmarks.speed --json output")
    p.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    return plot(json.loads(args.json.read_text()), args.output)


if __name__ == "__main__":
    print(main())
