"""The calibrated columns of section 6's extraction table, filled from saved results.

``benchmarks.extract_adapters --methods whiten ... --name extract_adapters_calibrated`` measures
calibration-aware adapters; this rewrites ``benchmarks/results/ecosystem.md``: two columns appended
to the extraction table (every existing cell kept verbatim) and the paragraph between the
``extract-calibrated`` markers. Without the results file the cells read "pending". Then
``python -m benchmarks report`` assembles BENCHMARKS.md.

    python -m benchmarks.extract_calibrated [--results benchmarks/results/extract_adapters_calibrated.json]
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path

from .common import DEFAULT_RESULTS

FRAGMENT = DEFAULT_RESULTS / "ecosystem.md"
RESULTS = DEFAULT_RESULTS / "extract_adapters_calibrated.json"
PLAIN = DEFAULT_RESULTS / "extract_adapters.json"
TABLE_HEADER = "| model | held-out perplexity | vs tuned | gain kept | LoRA params |"
ADDED = ("calibrated (whiten): held-out perplexity", "calibrated: gain kept")
BEGIN, END = "<!-- extract-calibrated -->", "<!-- /extract-calibrated -->"
ROW = re.compile(r"^\| base \+ adapter, budget ([0-9.]+) \|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _append(line: str, keep: int, added: list[str]) -> str:
    """``line`` cut after its first ``keep`` cells (byte for byte), then the ``added`` cells."""
    kept = "|".join(line.rstrip().split("|")[: keep + 1])
    return kept + "".join(f"| {c} " if c else "| " for c in added) + "|"


def add_columns(fragment: str, results: dict | None) -> str:
    """The fragment with the calibrated columns (re)written into the extraction table."""
    lines = fragment.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER)), None)
    if start is None:
        raise SystemExit(f"the extraction table ({TABLE_HEADER}...) is not in the fragment")
    header = _cells(lines[start])
    keep = header.index(ADDED[0]) if ADDED[0] in header else len(header)  # idempotent: drop our old columns
    rows = (results or {}).get("rows", {})
    base, tuned = (rows.get(k, {}).get("perplexity") for k in ("base", "tuned"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        if end == start:
            added = list(ADDED)
        elif end == start + 1:
            added = ["---", "---"]
        elif match := ROW.match(lines[end]):
            row = rows.get(f"adapter-whiten@{float(match.group(1))}")
            if row is None:
                added = ["pending", "pending"]
            else:
                ppl = row["perplexity"]
                added = [f"{ppl:.2f}", f"{(base - ppl) / (base - tuned):.1%}"]
        else:
            added = ["", ""]
        lines[end] = _append(lines[end], keep, added)
        end += 1
    return "\n".join(lines)


def paragraph(results: dict | None, plain: dict | None) -> str:
    """The text under the table: how the calibrated column was measured, or the command that will."""
    command = (
        "OMP_NUM_THREADS=1 python -m benchmarks.extract_adapters --base /root/.cache/svdlora/SmolLM2-135M "
        '--tuned .cache/smollm2-shakespeare --budgets 0.01,0.03,0.1,0.3 --whole-budgets "" --limit 16 '
        "--max-length 256 --methods whiten --calibration /work/shared/data/text/tinyshakespeare.txt "
        "--name extract_adapters_calibrated"
    )
    how = (
        "Calibrated columns: `svdlora extract --calibration DATA` (method `whiten`): the tuned model runs on "
        "calibration text, each layer's input Gram E[x xᵀ] is collected, and each delta is factorized under "
        "that input whitening, so the adapter minimizes the delta's output error on those inputs instead of "
        "‖ΔW − BA‖; same ranks and adapter bytes as the plain rows. Calibration text: windows spread over the "
        "*training* part of Tiny Shakespeare (the first 90%, which the fine-tune saw); the evaluation text is "
        "the first 16 × 256 tokens of `heldout.txt`, the last 10% (the script checks that the split "
        "reproduces `heldout.txt`), so no evaluated token is calibrated on."
    )
    if results is None:
        return (
            f"{how} **Pending**: not measured yet (the shared CPU was reserved for another benchmark while "
            f"this was built). Command: `{command}`, then `python -m benchmarks.extract_calibrated` and "
            "`python -m benchmarks report`."
        )
    rows, machine, cal = results["rows"], results["machine"], results["calibration"]
    same = plain is not None and all(
        abs(rows[k]["perplexity"] - plain["rows"][k]["perplexity"]) < 1e-6 for k in ("base", "tuned")
    )
    errors = [
        f"{r['budget']}: {r['output_rel_error_mean']:.3f}"
        for k, r in rows.items()
        if k.startswith("adapter-whiten@") and r.get("output_rel_error_mean") is not None
    ]
    plain_errors = [
        f"{r['budget']}: {r['output_rel_error_mean']:.3f}"
        for k, r in rows.items()
        if k.startswith("adapter@") and r.get("output_rel_error_mean") is not None
    ]
    versus = f" (plain SVD factors in the same metric: {', '.join(plain_errors)})" if plain_errors else ""
    seconds = [f"{r['extract_seconds']:.0f}" for k, r in rows.items() if k.startswith("adapter-whiten@")]
    return (
        f"{how} Command: `{results['command']}` (results: `benchmarks/results/extract_adapters_calibrated.json`); "
        f"{cal['windows']} windows, {cal['tokens']:,} calibration tokens, statistics collected once in "
        f"{cal['seconds']:.0f} s and reused for every budget; extraction {' / '.join(seconds)} s per budget. "
        f"Mean relative output error of the delta on the calibration inputs, per budget: {', '.join(errors)}{versus}. "
        f"Base and tuned perplexity {'reproduce' if same else 'DO NOT reproduce'} the plain run's exactly. "
        f"Machine: {machine['platform']}, {machine['cpu_count']} shared CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} thread), {machine['device']}; date {machine['date']}."
    )


def render(fragment: str, results: dict | None, plain: dict | None) -> str:
    text = add_columns(fragment, results)
    wrapped = textwrap.fill(paragraph(results, plain), 100, break_long_words=False, break_on_hyphens=False)
    block = f"{BEGIN}\n{wrapped}\n{END}"
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        return head + block + rest.partition(END)[2]
    # first time: right after the table
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:end] + ["", block] + lines[end:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--fragment", type=Path, default=FRAGMENT)
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.exists() else None
    plain = json.loads(PLAIN.read_text()) if PLAIN.exists() else None
    args.fragment.write_text(render(args.fragment.read_text(), results, plain))
    print(f"wrote {args.fragment} ({'measured' if results else 'pending'})")


if __name__ == "__main__":
    main()
