"""What a sweep leaves in its folder: sweep.md (a table), sweep.json (the points) and sweep.png (a plot),
replaced whole, and only where an earlier sweep wrote them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import SvdloraError
from .io.outputs import check_writable, files_replaced_together, folders_made_for, json_keys

logger = logging.getLogger(__name__)


def format_table(record: dict) -> str:
    """Markdown: one row per budget and the dense model."""
    metric, dense = record["metric"], record["dense"]
    lines = [f"| budget | params | est. bytes | {metric} | vs dense |", "|---|---|---|---|---|"]
    for p in [*record["points"], dense]:
        ratio = p["quality"] / dense["quality"] if dense["quality"] else float("nan")
        # the budget as sweep.json and the target line give it: a bisection's 0.137031 read 0.137 (4 digits)
        name = "dense" if p["budget"] is None else str(p["budget"])
        lines.append(f"| {name} | {p['params']:,} | {p['bytes_estimate']:,} | {p['quality']:.4g} | {ratio:.3f}x |")
    measured = record["dense"].get("result")
    if measured:  # every point is measured alike: the dense model's data, limit and settings are theirs
        from .evaluation.report import measured_on  # torch is loaded where a model was evaluated

        lines += ["", f"Measured on {measured_on(measured)}."]
    for budget, why in record.get("skipped", {}).items():
        lines += ["", f"Budget {budget} not measured: {why}"]
    if record.get("monotone") is False:  # said in the log only, and the reader of sweep.md never saw it
        lines += ["", f"{metric} is not monotone in the budget over these points: a bisection may miss."]
    failed = record.get("failed")
    if failed:
        lines += ["", f"Budget {failed['budget']} failed ({failed['error']}): the sweep stopped there."]
    if "target" in record:
        t = record["target"]
        found = f"budget {t['budget']}" if t["budget"] is not None else "no budget up to 1.0"
        found = "not found, the sweep stopped" if failed else found
        lines += ["", f"Target `{t['text']}`: {found} (bisection tolerance {t['tolerance']})."]
    return "\n".join(lines)


def plot(record: dict, path: Path, title: str) -> Path | None:
    """Quality against parameters, with the dense model as a line; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    points, dense = record["points"], record["dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["params"] / 1e6 for p in points]
    ax.plot(xs, [p["quality"] for p in points], "o-", label="svdlora")
    for p, x in zip(points, xs, strict=True):
        ax.annotate(f"{p['budget']:.3g}", (x, p["quality"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(dense["quality"], color="gray", linestyle="--", label=f"dense ({dense['params'] / 1e6:.1f}M params)")
    if record["metric"] == "perplexity":  # spans orders of magnitude once compression hurts
        ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(record["metric"])
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # a temporary name's suffix is no format
    plt.close(fig)
    return path


SWEEP_FILES = ("sweep.md", "sweep.json", "sweep.png")


def check_sweep_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder whose sweep files ``write_outputs`` would replace: without --overwrite, or
    when they are not an earlier sweep's (its sweep.json says so), since --overwrite replaces only that. A file, a
    folder inside one, or an unwritable folder is refused too: before the sweep, not once every budget is measured."""
    check_writable(folder / "sweep.json", "--output", str(folder))
    existing = [name for name in SWEEP_FILES if (folder / name).exists()]
    if not existing:
        return
    if not overwrite:
        raise SvdloraError(
            f"{str(folder)!r} already holds {', '.join(existing)}: pass --overwrite or choose another folder"
        )
    if not _is_sweep_record(folder / "sweep.json"):
        raise SvdloraError(
            f"{str(folder)!r} holds {', '.join(existing)}, not written by an svdlora sweep (its sweep.json would "
            "say so): --overwrite only replaces an earlier sweep; choose another folder or remove them yourself"
        )


def _is_sweep_record(path: Path) -> bool:
    return {"task", "metric", "dense", "points"} <= json_keys(path)


def write_outputs(record: dict, folder: Path, title: str) -> list[Path]:
    """sweep.md, sweep.json and sweep.png in ``folder`` (``check_sweep_folder`` first), replacing an earlier
    sweep's as one set: all three are written first, then renamed into place (a failure leaves no folder it made)."""
    slim = {**record, "dense": _slim(record["dense"]), "points": [_slim(p) for p in record["points"]]}
    paths = [folder / name for name in SWEEP_FILES]
    with folders_made_for(folder), files_replaced_together(paths) as (md, data, png):
        md.write_text(f"# {title}\n\n{format_table(record)}\n")
        data.write_text(json.dumps(slim, indent=2, sort_keys=True) + "\n")
        # without matplotlib none: an earlier sweep's plot (--overwrite) would show its points beside this table
        plot(record, png, title)
    return [path for path in paths if path.exists()]


def _slim(point: dict) -> dict:
    """A point with its evaluate() result cut to the figures (no per-model timing noise)."""
    result = point.get("result") or {}
    model = result.get("model") or {}
    return {
        **{k: v for k, v in point.items() if k != "result"},
        "metrics": model.get("metrics"),
        "data": result.get("data"),
        "settings": result.get("settings"),
    }
