"""BENCHMARKS.md section *Quality* from the saved results of ``benchmarks.quality`` (SmolLM2) and
``benchmarks.quality_models`` (ViT, Marian): every method side by side, and issue 8's targets,
each marked reached or missed with the measured figure.

Usage:
    python -m benchmarks.quality_report      # benchmarks/results/quality*.json -> quality.md
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import DEFAULT_RESULTS

PLAIN = "plain SVD, uniform (sources)"
DEFAULT = "kfac + global + pivoted factors (PIFA)"  # the default with calibration data
SELF = "no data: self-generated text, kfac + global + pivoted (default)"
# Healing rows were labelled "default + healing" until they carried their row's label: which model
# the default was in each part (quality-pivot.json healed at 1 thread while the test suite ran beside it)
DEFAULT_HEALED = {
    "quality-b2.json": "Fisher + global",
    "quality-heal.json": "kfac + global",
    "quality-pivot.json": "kfac + global + pivoted (1 thread, test suite running beside it)",
}
# rows measured while another setting was the default kept that label in their JSON
RENAMES = {
    "Fisher + global + refit (default)": "Fisher + global + refit (16 samples)",
    "no data: self-generated text, Fisher + global (default)": "no data: self-generated text, Fisher + global",
    "no data: self-generated text, kfac + global (default)": "no data: self-generated text, kfac + global",
}


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ppl(row: dict) -> str:
    p = row["perplexity"]
    return f"{p:,.3g} ({row['x_dense']:.2e}×)" if p > 1e4 else f"{p:.2f} ({row['x_dense']:.2f}×)"


BYTES = "(budget in bytes)"  # issue 9's stage-dtype rows: a byte budget, shown apart by bits per weight


def smollm2(data: dict) -> list[str]:
    for r in data["rows"]:
        r["setting"] = RENAMES.get(r["setting"], r["setting"])
    quantized = [r for r in data["rows"] if BYTES in r["setting"]]
    rows = data["rows"] = [r for r in data["rows"] if BYTES not in r["setting"]]
    budgets = sorted({r["budget"] for r in rows if r["budget"] < 1 and "healing" not in r["setting"]}, reverse=True)
    settings = list(dict.fromkeys(r["setting"] for r in rows if "healing" not in r["setting"] and r["budget"] < 1))
    plain_time = {r["budget"]: r["seconds"] for r in rows if r["setting"] == PLAIN}
    m = data["machine"]
    p = data["protocol"]
    threads = sorted({m["torch_threads"], *data.get("threads", ())})
    stats = {k: [v, *data.get("stats_runs", {}).get(k, [])] for k, v in data["stats_seconds"].items()}
    for k, v in data.get("stats_runs", {}).items():
        stats.setdefault(k, v)
    out = [
        f"SmolLM2-135M, WikiText-2 test, first {p['limit']} windows of 512 tokens, float32; dense perplexity "
        f"**{data['dense_perplexity']:.2f}**. Calibration: {p['samples']} windows of 512 tokens of WikiText-2 "
        f"*valid* (never the test text), or {p['samples']} samples of 256 tokens the model wrote itself from its "
        f"BOS token (no data). Measured {m['date']} on {m['platform']} ({m['cpu_count']} cores shared with other "
        f"jobs, torch {m['torch']}, {'/'.join(map(str, threads))} threads per run). Command: "
        "`python -m benchmarks.quality` in parts (`--budgets`, `--rows`, `--name quality-PART`, statistics cached "
        "between parts), then `python -m benchmarks.quality_report`; every part's JSON is in benchmarks/results.",
        "",
        "Perplexity (× dense), and the compression time relative to plain SVD. A calibrated row's time counts "
        "the whole statistics collection it used, which took "
        + ", ".join(f"{k} {min(v):.0f}–{max(v):.0f} s" for k, v in stats.items())
        + " depending on how busy the shared machine was: the time ratios are rough.",
        "",
        "| setting | " + " | ".join(f"budget {b}" for b in budgets) + " | time vs plain SVD |",
        "| --- | " + " | ".join("---" for _ in budgets) + " | --- |",
    ]
    for setting in settings:
        cells, times = [], []
        for b in budgets:
            row = next((r for r in rows if r["setting"] == setting and r["budget"] == b), None)
            cells.append(_ppl(row) if row else "not run")
            if row and b in plain_time:
                times.append(row["seconds"] / plain_time[b])
        low, high = (f"{min(times):.0f}", f"{max(times):.0f}") if times else ("", "")
        span = (low if low == high else f"{low}–{high}") + "×" if times and setting != PLAIN else "1× (" + ", ".join(
            f"{plain_time[b]:.0f} s" for b in budgets if b in plain_time) + ")"  # fmt: skip
        shown = f"{setting} (the default with data)" if setting == DEFAULT else setting
        out.append(f"| {shown} | " + " | ".join(cells) + f" | {span} |")
    if quantized:
        out += ["", "Stage dtypes (issue 9's `--stage-dtypes full-int4,int8`: the whole matrix in int4 group 128, "
                "then a low-rank int8 repair stage), the budget counted in bytes of the float32 matrices:", "",
                "| setting | bits per weight | perplexity (× dense) | answer |",
                "| --- | --- | --- | --- |"]  # fmt: skip
        out += [
            f"| {r['setting'].replace(BYTES, '').strip()} | {r['bits_per_weight']:.2f} | {_ppl(r)} | {r['answer']!r} |"
            for r in quantized
        ]
    answers = [r for r in rows if r.get("answer") is not None]
    if answers:
        out += ["", "Greedy answer to the README demo's question \"What is the capital of France?\" "
                "(the dense model: "
                "\"The capital of France is Paris.\"):", "",
                "| setting | budget | answer |", "| --- | --- | --- |"]  # fmt: skip
        out += [f"| {r['setting']} | {r['budget']} | {r['answer']!r} |" for r in answers]
    heal = [r for r in rows if "healing" in r["setting"] or "control" in r["setting"]]
    if heal:
        out += ["", "Healing (fine-tuning the factors only, on the calibration windows, time-limited, same CPU):", ""]
        out += [
            "| setting | budget | perplexity (× dense) | steps | loss first → last |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in heal:
            h = r.get("heal") or {}
            out.append(
                f"| {r['setting']} | {r['budget']} | {_ppl(r)} | {h.get('steps', '')} | "
                f"{h.get('first_loss', 0):.3f} → {h.get('last_loss', 0):.3f} |"
            )
    return out


def targets(data: dict) -> list[str]:
    rows = data["rows"]

    def find(setting_start: str, budget: float) -> dict | None:
        return next((r for r in rows if r["setting"].startswith(setting_start) and r["budget"] == budget), None)

    controls = [r for r in rows if "control" in r["setting"]]

    def healed(loss: str) -> dict | None:  # the default model healed on the quiet machine, else any healed row
        found = [r for r in rows if f"healing ({loss}" in r["setting"]]
        return next((r for r in found if r["setting"].startswith(DEFAULT)), found[0] if found else None)

    lm, distill = healed("lm"), healed("distill")
    # the control run beside the LM-healed model (same part, same machine state), else any
    control = next((r for r in controls if lm and r.get("_part") == lm.get("_part")), controls[0] if controls else None)
    cells = [
        ("budget 0.8, no healing", find(DEFAULT, 0.8), 1.25, "x_dense"),
        ("budget 0.5, no healing", find(DEFAULT, 0.5), 2.5, "x_dense"),
        ("budget 0.5, healing (distillation) ≤ 10 min", distill, 1.6, "x_dense"),
        ("no calibration data, budget 0.8", find(SELF, 0.8), 2.0, "x_dense"),
    ]
    out = [
        "",
        "Issue 8's targets on this protocol:",
        "",
        "| setting | target | measured | |",
        "| --- | --- | --- | --- |",
    ]
    for label, row, target, key in cells:
        if row is None:
            out.append(f"| {label} | ≤ {target}× dense | not run | |")
            continue
        value = row[key]
        out.append(f"| {label} | ≤ {target}× dense | {value:.2f}× | {'reached' if value <= target else 'missed'} |")
    if lm and control:
        value = lm["perplexity"] / control["perplexity"]
        out.append(
            f"| budget 0.5, healing (LM loss) ≤ 10 min, vs the dense model given the same fine-tune "
            f"({control['perplexity']:.2f}); measured on {lm['setting'].split(' + healing')[0]} "
            f"| ≤ 1.6× | {value:.2f}× ({lm['x_dense']:.2f}× the untuned dense) | "
            f"{'reached' if value <= 1.6 else 'missed'} |"
        )
    return out


def other_models(data: dict, note: str = "") -> list[str]:
    out = []
    for name, metrics in (("vit", ("accuracy",)), ("marian", ("bleu", "chrf"))):
        entry = data.get(name)
        if not entry:
            continue
        dense = entry["dense"]
        budgets = sorted({r["budget"] for r in entry["rows"]}, reverse=True)
        title = "ViT / CIFAR-10 (top-1 accuracy" if name == "vit" else "Marian / Multi30k de→en (BLEU, chrF"
        title += note
        out += [
            "",
            f"{title}; dense {', '.join(f'{k} {dense[k]:.4g}' for k in metrics)}; calibration: "
            f"`{entry['calibration']}`, statistics {entry['stats_seconds']:.0f} s):",
            "",
            "| setting | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "| --- | " + " | ".join("---" for _ in budgets) + " |",
        ]
        renames = {  # labels of rows measured while another setting was the default
            "Fisher + global + refit (default)": "Fisher + global + refit",
            "+ global allocation (default)": "+ global allocation",
        }
        for r in entry["rows"]:
            r["setting"] = renames.get(r["setting"], r["setting"])
        for setting in dict.fromkeys(r["setting"] for r in entry["rows"]):
            cells = []
            for b in budgets:
                r = next(x for x in entry["rows"] if x["setting"] == setting and x["budget"] == b)
                cells.append(" / ".join(f"{r[k]:.4g} ({r[k] - dense[k]:+.3g})" for k in metrics))
            out.append(f"| {setting} | " + " | ".join(cells) + " |")
        first = metrics[0]
        out += ["", f"Target: the drop in {first} from dense at most half of plain SVD's (the issue sets it at "
                "budget 0.8; every budget shown):"]  # fmt: skip
        for b in budgets:
            plain = next((r for r in entry["rows"] if r["setting"] == PLAIN and r["budget"] == b), None)
            ours = next((r for r in entry["rows"] if r["setting"] == DEFAULT and r["budget"] == b), None)
            if plain and ours:
                drop_plain, drop_ours = dense[first] - plain[first], dense[first] - ours[first]
                verdict = "reached" if drop_ours <= drop_plain / 2 else "missed"
                if drop_plain <= 0:
                    verdict = "no drop to halve: plain SVD loses nothing here"
                out.append(
                    f"- budget {b}: plain SVD drops {drop_plain:+.4g}, {DEFAULT} {drop_ours:+.4g}: **{verdict}**"
                )
        if name == "vit":
            p = dense[first]
            n = entry.get("test_examples", 2000)
            se = (p * (1 - p) / n) ** 0.5
            out.append(f"\nSampling noise: the standard error of an accuracy of {p:.3f} on {n} test images is "
                       f"±{se:.3f}; differences smaller than that are not measured differences.")  # fmt: skip
        out.append(f"\nCommand: `{data.get('command', 'python -m benchmarks.quality_models')}`.")
    return out


def _rates_flag(protocol: dict) -> str:
    """heal_sweep's --lrs as run, where it was not the default (the quoted command must measure the table's rates)."""
    from benchmarks.heal_sweep import DEFAULT_LRS

    rates = json.loads(protocol.get("lrs", "null") or "null")
    return "" if rates in (None, DEFAULT_LRS) else " --lrs " + " ".join(f"{r:g}" for r in rates)


def heal_rate(data: dict) -> list[str]:
    """The healing learning rate, chosen on held-out valid text (``benchmarks.heal_sweep``)."""
    p = data["protocol"]
    pivot = p.get("pivot") == "True"  # pivoted factors (svdlora compress's default); the first sweep's are pairs
    threads = data["machine"]["torch_threads"]
    out = [
        "",
        f"Healing's learning rate, chosen without the test text (`python -m benchmarks.heal_sweep --budget "
        f"{p['budget']} --method {p['method']}{' --pivot' if pivot else ''}{_rates_flag(p)} "
        f"--seconds {float(p['seconds']):.0f}`"
        f"{', pivoted factors' if pivot else ''}): distillation KL on "
        f"{data['holdout_windows']} held-out WikiText-2 valid windows, {data['holdout_kl_before']:.3f} before healing "
        f"({threads} thread{'s' if threads > 1 else ''}, {data['machine']['date']}):",
        "",
        "| peak rate | steps | train KL first → last | held-out KL |",
        "| --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        h = r["heal"]
        out.append(
            f"| {r['lr']:g} | {h['steps']} | {h['first_loss']:.3f} → {h['last_loss']:.3f} | {r['holdout_kl']:.3f} |"
        )
    return out


def render(results: Path = DEFAULT_RESULTS) -> Path:
    lines = ["## Quality: compressed models that still work (issue 8)", ""]
    data = _load(results, "quality")
    for extra in sorted(results.glob("quality-*.json")):  # runs resumed with other --budgets / --rows
        more = json.loads(extra.read_text())
        for r in more["rows"]:
            r["_part"] = extra.name
        if extra.name in DEFAULT_HEALED:
            for r in more["rows"]:
                r["setting"] = r["setting"].replace("default + healing", f"{DEFAULT_HEALED[extra.name]} + healing")
        if data is None:
            data = more
        elif (
            more["protocol"]["samples"] == data["protocol"]["samples"]
            and more["dense_perplexity"] == data["dense_perplexity"]
        ):
            data["rows"] += more["rows"]
            for which, seconds in more["stats_seconds"].items():
                data.setdefault("stats_runs", {}).setdefault(which, []).append(seconds)
            data.setdefault("threads", set()).add(more["machine"]["torch_threads"])
    if data:
        lines += smollm2(data) + targets(data)
    for extra in sorted(results.glob("quality[0-9]*-*.json")):  # the same rows with more calibration windows
        more = json.loads(extra.read_text())
        for r in more["rows"]:
            lines.append(
                f"\nWith {more['protocol']['samples']} calibration windows instead of 64 (`--samples "
                f"{more['protocol']['samples']}`, {extra.name}): {r['setting']} at budget {r['budget']}: "
                f"{r['perplexity']:.2f} ({r['x_dense']:.3f}× dense), answer {r['answer']!r}."
            )
    for name in ("heal_sweep", "heal_sweep-pivot"):
        sweep = _load(results, name)
        if sweep:
            lines += heal_rate(sweep)
    notes = {"quality_marian": "; the first 300 test sentences", "quality_marian_1000": "; all 1,000 test sentences"}
    for name in ("quality_vit", "quality_marian", "quality_marian_1000"):
        other = _load(results, name)
        if other:
            lines += other_models(other, notes.get(name, ""))
    if _load(results, "quality_marian") is None:
        lines += ["", "Marian / Multi30k: not run yet (`python -m benchmarks.quality_models --marian FOLDER`; the "
                  "model of `benchmarks.train_marian` takes ~22 min to train on this CPU)."]  # fmt: skip
    path = results / "quality.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(render())
