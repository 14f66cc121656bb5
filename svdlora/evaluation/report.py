"""Ratios between a model and its baseline, and the side-by-side table the CLI prints."""

from __future__ import annotations

import numbers

# Per-model figures that get a ratio, besides every numeric entry of "metrics".
RATIO_FIELDS = (
    "parameters", "bytes_on_disk", "model_memory_bytes", "peak_memory_bytes",
    "load_time_s", "wall_time_s", "model_time_s", "throughput",
)  # fmt: skip

# (key, label, how to show it), in table order; metrics first, then cost.
_METRIC_ROWS = (
    ("perplexity", "perplexity", "{:.4f}"),
    ("nll", "nll (nats/token)", "{:.5f}"),
    ("tokens", "scored tokens", "{:,}"),
    ("windows", "windows", "{:,}"),
    ("accuracy", "top-1 accuracy", "{:.2%}"),
    ("correct", "correct", "{:,}"),
    ("total", "images", "{:,}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("sentences", "sentences", "{:,}"),
)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def ratio(value, reference) -> float | None:
    """value / reference, or None when either is missing or the reference is 0."""
    if not (_is_number(value) and _is_number(reference)) or reference == 0:
        return None
    return value / reference


def ratios(model: dict, baseline: dict) -> dict[str, float | None]:
    """compressed / original for every per-model figure and every numeric metric."""
    out = {key: ratio(model[key], baseline[key]) for key in RATIO_FIELDS}
    for key, value in model["metrics"].items():
        if _is_number(value):
            out[key] = ratio(value, baseline["metrics"].get(key))
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def _seconds(s) -> str:
    return "-" if s is None else f"{s:,.2f} s"


def _params(n) -> str:
    return f"{n / 1e6:,.3f} M" if n >= 100_000 else f"{n:,}"


def _rows(entry: dict) -> list[tuple[str, str, str | None]]:
    """(label, shown value, key of its ratio) for every line of one model's column."""
    metrics = entry["metrics"]
    rows = [(label, fmt.format(metrics[key]), key) for key, label, fmt in _METRIC_ROWS if key in metrics]
    rows += [
        (f"throughput ({entry['throughput_unit']})", f"{entry['throughput']:,.1f}", "throughput"),
        ("parameters", _params(entry["parameters"]), "parameters"),
        ("bytes on disk", _mib(entry["bytes_on_disk"]), "bytes_on_disk"),
        ("weights in memory", _mib(entry["model_memory_bytes"]), "model_memory_bytes"),
        ("peak memory", _mib(entry["peak_memory_bytes"]), "peak_memory_bytes"),
        ("load time", _seconds(entry["load_time_s"]), "load_time_s"),
        ("evaluation wall time", _seconds(entry["wall_time_s"]), "wall_time_s"),
        ("  of which in the model", _seconds(entry["model_time_s"]), "model_time_s"),
        ("device / dtype", f"{entry['device']} / {entry['dtype']}", None),
    ]
    return rows


def measured_with(settings: dict) -> list[str]:
    """The settings a task's figures depend on, in words (the table's heading and the model card's): the
    text windows' length and stride, the translator's beams and longest generation."""
    details = []
    if settings.get("max_length"):
        details.append(f"windows of {settings['max_length']} every {settings['stride']} tokens")
    if settings.get("num_beams"):
        details.append(f"{settings['num_beams']} beams, <= {settings['max_new_tokens']} new tokens")
    return details


def data_label(data: dict, quote: str = "") -> str:
    """The data a result's figures were measured on, in words (the table's heading and the model card's): its
    source, with a dataset's configuration and the split read (different data under the same source name)."""
    config = f" ({data['config']})" if data.get("config") else ""
    split = f" [{data['split']}]" if data.get("split") else ""
    return f"{quote}{data.get('source')}{quote}{config}{split}"


def measured_on(result: dict, quote: str = "") -> str:
    """What a result's figures were measured on, in words (the model card's evaluation line, sweep.md's): the
    data, its examples, the limit and the settings the task's figures depend on."""
    settings, data = result.get("settings") or {}, result.get("data") or {}
    # the windows / generation length too: without them a reader cannot measure the figures again
    details = "".join(f"; {detail}" for detail in measured_with(settings))
    limit = f"limit {settings['limit']}" if settings.get("limit") else "no limit"
    return f"{data_label(data, quote)} ({data.get('examples')} examples, {limit}{details})"


def format_table(result: dict) -> str:
    """The result as a readable table: one column per model, plus the ratio when there is a baseline."""
    model, baseline, task_ratios = result["model"], result["baseline"], result["ratios"]
    settings, data = result["settings"], result["data"]
    details = [f"batch {settings['batch_size']}", *measured_with(settings)]
    if settings["limit"]:
        details.append(f"limit {settings['limit']}")
    if settings.get("runtime"):
        details.append(f"runtime {settings['runtime']}")
    lines = [
        f"{result['task']} on {data_label(data)}: {data['examples']:,} examples, " + ", ".join(details),
        f"model:    {model['name']}" + (" (svdlora compressed)" if model["compressed"] else ""),
    ]
    if baseline:
        lines.append(f"baseline: {baseline['name']}" + (" (svdlora compressed)" if baseline["compressed"] else ""))
    header = ["", "model"] + (["baseline", "ratio"] if baseline else [])
    table = [header]
    base_rows = _rows(baseline) if baseline else None
    for i, (label, value, key) in enumerate(_rows(model)):
        row = [label, value]
        if baseline:
            r = task_ratios.get(key) if key else None
            row += [base_rows[i][1], "-" if r is None else f"{r:.3f}"]
        table.append(row)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    for key in ("bleu_signature", "chrf_signature"):
        if key in model["metrics"]:
            lines.append(f"{key.split('_')[0]} signature: {model['metrics'][key]}")
    lines.append(f"peak memory: {model['peak_memory_method']}")
    return "\n".join(lines)
