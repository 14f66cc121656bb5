"""Stage precision (issue 9): perplexity against bits per original weight of the targeted matrices.

SmolLM2-135M (float32), WikiText-2 test, the first 24 windows of 512 tokens every 512 (dense 27.44).
Every setting goes through ``svdlora.compress`` (so the stages are exactly what a folder stores),
on a fresh copy of the model; bits per weight are read back from the report (scales included).

Parts (run separately, e.g. in parallel, each writes its own JSON):
    levels  at 16, 8, 6, 4.5, 3 bits/weight: one bfloat16 stage; 2 int8 low-rank stages;
            a full-rank int4 (group 128; also 64 and 32 from 4.5 and 6 bits) or int8 first stage
            + int8 low-rank repair where it fits
    rtn     plain round-to-nearest of the same matrices: int8 per channel, int4 group 128, 64 and 32
    library a known library on the same matrices: optimum-quanto qint4 / qint8 (its defaults; needs
            ``pip install optimum-quanto``)
    stages  the poster's Table 1 at a fixed byte budget: n = 1..9 int8 stages at 6 bits/weight
            (run in the order 1, 2, 3, 5, 9, 4, 6, 7, 8)
    repair  the same at 6 bits/weight for a full-rank int4 first stage + n-1 int8 repair stages, n = 2, 3, 5

Calibrated rows (recorded with ``--calibration /work/shared/data/text/wikitext-2.valid.txt``): 64
windows of 512 tokens of WikiText-2 valid, statistics collected ONCE on the dense model and passed to
every row's ``compress`` (method fisher, allocation global; ``--refit`` adds the refit pass through the
quantized chain); ``--statistics FILE`` keeps them on disk for the next part.

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.precision --part levels [--model DIR] [--data TEST.txt]
    python -m benchmarks.precision --part levels --calibration VALID.txt --statistics /tmp/stats.pt \
        [--bits 4.5 8] [--recipes 'full-int4 + int8 repair'] [--refit]
    python -m benchmarks.precision --report        # markdown tables from the JSON files
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_RESULTS, smollm2_folder, write_results
from benchmarks.data import require

logger = logging.getLogger(__name__)

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "wikitext-2.test.txt"
BITS = (16, 8, 6, 4.5, 3)
MODEL_BITS = 32  # SmolLM2 folder is float32: budget = bits / 32


def level_settings() -> list[dict]:
    settings = []
    for bits in BITS:
        settings.append({"bits": bits, "recipe": "one bfloat16 stage", "stage_dtypes": ["bfloat16"], "n": 1})
        settings.append({"bits": bits, "recipe": "2 int8 stages", "stage_dtypes": ["int8"], "n": 2})
        if bits >= 8.5:
            settings.append(
                {"bits": bits, "recipe": "full-int8 + int8 repair", "stage_dtypes": ["full-int8", "int8"], "n": 2}
            )
        elif bits >= 4.4:
            settings.append(
                {"bits": bits, "recipe": "full-int4 + int8 repair", "stage_dtypes": ["full-int4", "int8"], "n": 2}
            )
            for group, least in (("int4g64", 4.4), ("int4g32", 4.8)):  # finer groups: a better base, less repair
                if bits >= least:
                    recipe = f"full-{group} + int8 repair"
                    settings.append({"bits": bits, "recipe": recipe, "stage_dtypes": [f"full-{group}", "int8"], "n": 2})
    return settings


def rtn_settings() -> list[dict]:
    return [
        {"bits": None, "recipe": f"RTN {name}", "stage_dtypes": [f"full-{name}"], "n": 1}
        for name in ("int8", "int4g64", "int4", "int4g32")
    ]


def stage_settings(bits: float = 6, counts=(1, 2, 3, 5, 9, 4, 6, 7, 8)) -> list[dict]:
    return [{"bits": bits, "recipe": f"{n} int8 stages", "stage_dtypes": ["int8"], "n": n} for n in counts]


def repair_settings(bits: float = 6, counts=(2, 3, 5)) -> list[dict]:
    return [
        {"bits": bits, "recipe": f"full-int4 + {n - 1} int8 stages", "stage_dtypes": ["full-int4", "int8"], "n": n}
        for n in counts
    ]


def library_settings() -> list[dict]:
    """A known quantization library on the same matrices (optimum-quanto, pip install optimum-quanto)."""
    return [
        {"bits": None, "recipe": f"optimum-quanto {q}", "stage_dtypes": [], "n": 0, "library": q}
        for q in ("qint4", "qint8")
    ]


PARTS = {
    "levels": level_settings,
    "rtn": rtn_settings,
    "stages": stage_settings,
    "repair": repair_settings,
    "library": library_settings,
}


def run_library(model, tokenizer, setting: dict, data: Path, limit: int = 24, length: int = 512) -> dict:
    """One optimum-quanto row: weight-only quantization of the targeted matrices (quanto's defaults:
    qint4 in groups of 128 with a scale and a shift per group, qint8 per output channel), frozen.
    Two sizes: ``format_bits_per_weight``, the format's (the integer bits plus its scales and shifts),
    and ``bits_per_weight``, the tensors quanto holds here (on a CPU it keeps int4 values one per byte)."""
    from importlib.metadata import version

    from optimum import quanto

    from svdlora.config import CompressionConfig
    from svdlora.evaluation import evaluate
    from svdlora.targets import find_targets

    work = copy.deepcopy(model)
    targets, _ = find_targets(work, CompressionConfig())
    names = [t.name for t in targets]
    start = time.perf_counter()
    quanto.quantize(work, weights=getattr(quanto, setting["library"]), include=names)
    quanto.freeze(work)
    seconds = time.perf_counter() - start
    stored = params = format_bits = 0
    for name in names:
        weight = work.get_submodule(name).weight
        extras = [getattr(weight, k) for k in ("_scale", "_shift") if getattr(weight, k, None) is not None]
        stored += sum(t.numel() * t.element_size() for t in [weight._data, *extras])
        params += weight.shape[0] * weight.shape[1]
        format_bits += weight.shape[0] * weight.shape[1] * weight.qtype.bits
        format_bits += sum(8 * t.numel() * t.element_size() for t in extras)
    result = evaluate(
        (work, tokenizer), "text-generation", str(data), limit=limit, max_length=length, stride=length, progress=False
    )
    return {
        **setting,
        "recipe": f"{setting['recipe']} ({version('optimum-quanto')})",
        "budget": None,
        "bits_per_weight": 8 * stored / params,
        "format_bits_per_weight": format_bits / params,
        "stored_bytes": stored,
        "perplexity": result["model"]["metrics"]["perplexity"],
        "rel_error_mean": None,
        "compress_s": seconds,
    }


def calibration_source(model, tokenizer, path: Path, samples: int = 64, length: int = 512, cache: Path | None = None):
    """Batches and their statistics, collected ONCE on the dense model (as ``benchmarks.quality``
    does) and passed to every setting's ``compress``; ``cache`` keeps them on disk so the parts,
    run as separate processes, share one collection. Returns (batches, statistics, seconds)."""
    from svdlora.calibration import collect_statistics
    from svdlora.calibration_data import calibration_batches
    from svdlora.config import CompressionConfig
    from svdlora.targets import find_targets

    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=False)  # our own file: LayerStats objects
        if isinstance(saved, tuple):
            # benchmarks.quality's cache (stats-valid-64.pt): the same collection, (batches, stats, seconds)
            logger.info("calibration statistics from benchmarks.quality's cache %s", cache)
            return saved
        if (saved["data"], saved["samples"], saved["length"]) == (str(path), samples, length):
            logger.info("calibration statistics from %s (collected in %.0f s)", cache, saved["seconds"])
            return saved["batches"], saved["stats"], saved["seconds"]
    start = time.perf_counter()
    batches = calibration_batches(model, path, tokenizer, samples, length, progress=False)
    targets, _ = find_targets(model, CompressionConfig())
    stats = collect_statistics(model, targets, batches, gradients=True, progress=False)
    seconds = time.perf_counter() - start
    logger.info("calibration statistics in %.0f s", seconds)
    if cache is not None:
        saved = {"data": str(path), "samples": samples, "length": length, "seconds": seconds}
        torch.save(saved | {"batches": batches, "stats": stats}, cache)
    return batches, stats, seconds


def run_setting(
    model,
    tokenizer,
    setting: dict,
    data: Path,
    source=None,
    refit: bool = False,
    limit: int = 24,
    length: int = 512,
    method: str = "fisher",
) -> dict:
    """One row. ``source``: (batches, statistics, seconds) from ``calibration_source``, for the
    calibrated rows (Fisher-weighted whitening, global byte allocation, optionally the refit)."""
    from svdlora import compress
    from svdlora.evaluation import evaluate

    work = copy.deepcopy(model)
    budget = 1.0 if setting["bits"] is None else setting["bits"] / MODEL_BITS
    options = {}
    if source is not None:
        batches, stats, _ = source
        options = {"method": method, "allocation": "global", "refit": refit, "refit_stages": refit}
        options["calibration"] = batches
        options["statistics"] = stats
    start = time.perf_counter()
    report = compress(
        work,
        budget=budget,
        submatrices=setting["n"],
        stage_dtypes=setting["stage_dtypes"],
        progress=False,
        **options,
    )
    seconds = time.perf_counter() - start
    fac = report.factorized
    stored = sum(m.stored_bytes for m in fac)
    bits = 8 * stored / sum(m.params_before for m in fac)
    result = evaluate(
        (work, tokenizer), "text-generation", str(data), limit=limit, max_length=length, stride=length, progress=False
    )
    row = {
        **setting,
        "budget": budget,
        "bits_per_weight": bits,
        "stored_bytes": stored,
        "perplexity": result["model"]["metrics"]["perplexity"],
        "rel_error_mean": sum(m.rel_error for m in fac) / len(fac),
        "compress_s": seconds,
        "method": report.method,
        "allocation": report.allocation,
        "refit": bool(report.calibration and report.calibration["refit"]),
    }
    if source is not None:
        row["stats_s"] = source[2]  # collected once, shared by every calibrated row
        row["recipe"] += " + refit" if row["refit"] else ""
        row["recipe"] += f" ({method})" if method != "fisher" else ""  # fisher: the rows recorded first
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--model", type=Path, default=smollm2_folder())
    parser.add_argument("--data", type=Path, default=TEST)
    parser.add_argument("--only", type=int, nargs="*", help="indices of the part's settings to run")
    parser.add_argument("--bits", type=float, nargs="*", help="only the settings at these target bits/weight")
    parser.add_argument("--recipes", nargs="*", help="only these recipes (e.g. 'full-int4 + int8 repair')")
    parser.add_argument(
        "--calibration", type=Path, default=None, help="calibration text (WikiText-2 valid); none: plain SVD"
    )
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--statistics", type=Path, default=None, help="file caching the calibration statistics")
    parser.add_argument("--refit", action="store_true", help="calibrated rows: also run the refit pass")
    parser.add_argument(
        "--method",
        default="fisher",
        choices=["fisher", "kfac"],
        help="calibrated rows' method "
        "(kfac needs statistics with output Grams, e.g. benchmarks.quality's stats-valid-kfac-64.pt)",
    )
    parser.add_argument("--limit", type=int, default=24, help="test windows of 512 tokens")
    parser.add_argument("--length", type=int, default=512, help="tokens per test and calibration window")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--report", action="store_true", help="print markdown tables from the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.report:
        text = report(args.results)
        (args.results / "precision.md").write_text(text)
        print(text)
        return
    if args.part is None:  # else the model loads before PARTS[None] fails
        parser.error("--part is required (or --report)")
    require(
        {"--model": args.model, "--data": args.data} | ({"--calibration": args.calibration} if args.calibration else {})
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    settings = PARTS[args.part]()
    if args.only:
        settings = [settings[i] for i in args.only]
    if args.bits:
        settings = [s for s in settings if s["bits"] in args.bits]
    if args.recipes:
        settings = [s for s in settings if s["recipe"] in args.recipes]
    name = f"precision_{args.part}_{'calibrated' if args.calibration else 'svd'}"
    path = args.results / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    source = None
    if args.calibration:
        source = calibration_source(model, tokenizer, args.calibration, args.samples, args.length, args.statistics)
    for setting in settings:
        if "library" in setting:
            row = run_library(model, tokenizer, setting, args.data, args.limit, args.length)
        else:
            row = run_setting(
                model, tokenizer, setting, args.data, source, args.refit, args.limit, args.length, args.method
            )
        row["command"] = "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:])
        logger.info("%s", row)
        rows = [r for r in rows if (r["bits"], r["recipe"], r.get("n")) != (row["bits"], row["recipe"], row.get("n"))]
        rows.append(row)
        payload = {"model": str(args.model), "data": str(args.data), "limit": args.limit, "length": args.length}
        payload["rows"] = rows
        if args.calibration:
            payload["calibration"] = {"data": str(args.calibration), "samples": args.samples, "length": args.length}
        write_results(name, payload, args.results)


METHOD_TITLES = {"calibrated": "calibrated: whitening + global allocation", "svd": "plain SVD, no calibration"}


def _load(results: Path, name: str) -> dict | None:
    path = results / f"precision_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ppl(value: float) -> str:
    return f"{value:,.3f}" if value < 1e5 else f"{value:.2e}"


def _best(rows: list[dict], bits: float, one_stage: bool = False) -> dict | None:
    rows = [r for r in rows if r["bits"] == bits and (r["recipe"].startswith("one bfloat16 stage") == one_stage)]
    return min(rows, key=lambda r: r["perplexity"]) if rows else None


def _cell(row: dict | None, recipe: bool = True) -> str:
    if row is None:
        return "not run"
    text = f"{row['bits_per_weight']:.2f}: {_ppl(row['perplexity'])}"
    return f"{row['recipe']}, {text}" if recipe else text


def _comparison(results: Path) -> list[str]:
    """Calibrated beside plain SVD beside round-to-nearest at each size (the issue's table)."""
    calibrated, plain, rtn = (_load(results, n) for n in ("levels_calibrated", "levels_svd", "rtn_svd"))
    library = _load(results, "library_svd")
    if not calibrated:
        return []
    m = calibrated["machine"]
    cal = calibrated.get("calibration", {})
    lines = [
        "",
        "### Calibrated, plain SVD and round-to-nearest side by side",
        "",
        f"Calibrated rows: {cal.get('samples', 64)} windows of {cal.get('length', 512)} tokens of WikiText-2 valid,",
        "statistics collected once (Fisher-weighted whitening, global byte allocation; `+ refit`: the refit",
        f"pass through the quantized chain). Measured {m['date']}, {m['cpu_count']} shared CPUs,",
        f"{m['torch_threads']} thread(s). Cells: recipe, bits/w: perplexity.",
        "",
        "| target bits/w | best calibrated recipe | one bfloat16 stage, calibrated | best plain-SVD recipe "
        "| round-to-nearest within 0.5 bits/w | optimum-quanto within 0.5 bits/w |",
        "|---|---|---|---|---|---|",
    ]
    for bits in BITS:
        best = _best(calibrated["rows"], bits)
        one = _best(calibrated["rows"], bits, one_stage=True)
        if best is None and one is None:
            continue
        svd = _best(plain["rows"], bits) if plain else None
        near = [r for r in (rtn or {}).get("rows", []) if abs(r["bits_per_weight"] - bits) <= 0.5]
        near_text = "; ".join(f"{r['recipe']} {r['bits_per_weight']:.2f}: {_ppl(r['perplexity'])}" for r in near)
        lib = [r for r in (library or {}).get("rows", []) if abs(r["format_bits_per_weight"] - bits) <= 0.5]
        lib_text = "; ".join(
            f"{r['recipe']} {r['format_bits_per_weight']:.2f} (held as {r['bits_per_weight']:.2f}): "
            f"{_ppl(r['perplexity'])}"
            for r in lib
        )
        lines.append(
            f"| {bits} | {_cell(best)} | {_cell(one, False)} | {_cell(svd)} | {near_text or '-'} | {lib_text or '-'} |"
        )
    return lines


def report(results: Path = DEFAULT_RESULTS) -> str:
    """The BENCHMARKS.md fragment: the summary per size, then every measured row."""
    lines = [
        "## Stage precision: perplexity against bits per weight (issue 9)",
        "",
        "SmolLM2-135M (float32), WikiText-2 test, first 24 windows of 512 tokens, stride 512 (dense 27.44).",
        "Bits per weight = stored bytes of the targeted matrices (210 Linear layers; scales and zero",
        "points included) × 8 / their parameter count. Commands: `OMP_NUM_THREADS=1 python -m",
        "benchmarks.precision --part {levels,rtn,repair,stages}",
        "[--calibration /work/shared/data/text/wikitext-2.valid.txt]`,",
        "then `--report`. Every setting runs `svdlora.compress` on a fresh copy of the model.",
        "Recipes: `one bfloat16 stage` (`--stage-dtypes bfloat16`), `n int8 stages` (`int8`, n submatrices),",
        "`full-int4 + int8 repair` (`full-int4,int8`: the whole matrix in int4 group 128, then low-rank int8",
        "stages of its residual as stored; `full-int4g64`/`g32`: groups of 64/32), `RTN …` (`full-…` alone:",
        "plain round-to-nearest). Calibrated rows,",
        "when present, use the calibration issue's whitening and global allocation, statistics collected once",
        "on WikiText-2 valid. ViT and Marian: the last subsection (`benchmarks.precision_models`).",
    ]
    for method in ("calibrated", "svd"):
        levels = _load(results, f"levels_{method}")
        if not levels:
            continue
        m = levels["machine"]
        lines += [
            "",
            f"### Best recipe per size ({METHOD_TITLES[method]})",
            "",
            f"Measured {m['date']} on {m['platform']}, {m['cpu_count']} shared CPUs, torch {m['torch']}, "
            f"{m['torch_threads']} thread.",
            "",
            "| target bits/w | best svdlora recipe | its bits/w | its perplexity | one bfloat16 stage (bits/w: ppl) |",
            "|---|---|---|---|---|",
        ]
        for bits in BITS:
            rows = [r for r in levels["rows"] if r["bits"] == bits]
            if not rows:
                continue
            multi = [r for r in rows if not r["recipe"].startswith("one bfloat16 stage")]
            one = [r for r in rows if r["recipe"].startswith("one bfloat16 stage")]
            best = min(multi, key=lambda r: r["perplexity"]) if multi else None
            one_text = f"{one[0]['bits_per_weight']:.2f}: {_ppl(one[0]['perplexity'])}" if one else "not run"
            if best:
                lines.append(
                    f"| {bits} | {best['recipe']} | {best['bits_per_weight']:.2f} | {_ppl(best['perplexity'])} "
                    f"| {one_text} |"
                )
    lines += _comparison(results)
    for name, title in (
        ("rtn_svd", "Round-to-nearest weight quantization of the same matrices (what a user would pick instead)"),
        ("library_svd", "optimum-quanto weight quantization of the same matrices (a known library, its defaults)"),
        ("levels_calibrated", "Every measured recipe, calibrated"),
        ("levels_svd", "Every measured recipe, plain SVD"),
        ("stages_calibrated", "The poster's Table 1 at a fixed byte budget: n int8 stages, calibrated"),
        ("stages_svd", "The poster's Table 1 at a fixed byte budget: n int8 stages, plain SVD"),
        ("repair_calibrated", "Repair stages at a fixed byte budget, calibrated"),
        ("repair_svd", "Repair stages at a fixed byte budget (full-rank int4 + n-1 int8 stages), plain SVD"),
    ):
        data = _load(results, name)
        if not data:
            continue
        lines += [
            "",
            f"### {title}",
            "",
            f"{data['machine']['date']}, {data['machine']['platform']}, {data['machine']['torch_threads']} thread.",
            "",
            "| target bits/w | recipe | stage dtypes × n | bits/w | perplexity | mean rel. error | compress s |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = sorted(data["rows"], key=lambda r: (-(r["bits"] or 0), r["n"], r["recipe"]))
        for r in rows:
            dtypes = f"{','.join(r['stage_dtypes'])} × {r['n']}" if r["stage_dtypes"] else "-"
            error = "-" if r["rel_error_mean"] is None else f"{r['rel_error_mean']:.5f}"
            size = f"{r['bits_per_weight']:.2f}"
            if "format_bits_per_weight" in r:  # a library: its format's size, and what it holds here
                size = f"{r['format_bits_per_weight']:.2f} (held as {size})"
            lines.append(
                f"| {r['bits'] or '-'} | {r['recipe']} | {dtypes} | {size} "
                f"| {_ppl(r['perplexity'])} | {error} | {r['compress_s']:.0f} |"
            )
    if (results / "precision_models.json").is_file():
        from benchmarks import precision_models

        lines += ["", precision_models.report(results / "precision_models.json").rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
