"""Stage precision (issue 9): perplexity against bits per original weight of the targeted matrices.

SmolLM2-135M (float32), WikiText-2 test, the first 24 windows of 512 tokens every 512 (dense 27.44).
Every setting goes through ``svdlora.compress`` (so the stages are exactly what a folder stores),
on a fresh copy of the model; bits per weight are read back from the report (scales included).

Parts (run separately, e.g. in parallel, each writes its own JSON):
    levels  at 16, 8, 6, 4.5, 3 bits/weight: one bfloat16 stage; 2 int8 low-rank stages;
            a full-rank int4 (group 128) or int8 first stage + int8 low-rank repair where it fits
    rtn     plain round-to-nearest of the same matrices: int8 per channel, int4 group 128, 64 and 32
    stages  the poster's Table 1 at a fixed byte budget: n = 1..9 int8 stages at 6 bits/weight
            (run in the order 1, 2, 3, 5, 9, 4, 6, 7, 8)
    repair  the same at 6 bits/weight for a full-rank int4 first stage + n-1 int8 repair stages, n = 2, 3, 5

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.precision --part levels [--model DIR] [--data TEST.txt]
    python -m benchmarks.precision --report        # markdown tables from the JSON files
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_RESULTS, write_results

logger = logging.getLogger(__name__)

SMOLLM2 = Path(os.environ.get("SVDLORA_HOME", Path.home() / ".cache" / "svdlora")) / "SmolLM2-135M"
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


PARTS = {"levels": level_settings, "rtn": rtn_settings, "stages": stage_settings, "repair": repair_settings}


def cached_calibration(model, tokenizer, path: Path):
    """Collect the calibration statistics once; every setting's ``compress`` then reuses them.

    ``compress`` plans its calibration through ``svdlora.compress.plan_calibration``; the benchmark
    swaps that for a function returning the plan made once here (same data, same model weights,
    so the same statistics), because collecting them is the slow part of every run.
    """
    import svdlora.compress as compress_module
    from svdlora.config import CompressionConfig
    from svdlora.targets import find_targets

    config = CompressionConfig(budget=0.5, method="fisher", allocation="global")
    targets, _ = find_targets(model, config)
    start = time.perf_counter()
    plan = compress_module.plan_calibration(model, targets, config, str(path), tokenizer, False)
    logger.info("calibration statistics in %.0f s", time.perf_counter() - start)
    compress_module.plan_calibration = lambda *args, **kwargs: plan
    return plan


def run_setting(model, tokenizer, setting: dict, data: Path, calibration: Path | None = None) -> dict:
    from svdlora import compress
    from svdlora.evaluation import evaluate

    work = copy.deepcopy(model)
    budget = 1.0 if setting["bits"] is None else setting["bits"] / MODEL_BITS
    start = time.perf_counter()
    options = {"calibration": str(calibration), "processor": tokenizer} if calibration else {}
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
        (work, tokenizer), "text-generation", str(data), limit=24, max_length=512, stride=512, progress=False
    )
    return {
        **setting,
        "budget": budget,
        "bits_per_weight": bits,
        "stored_bytes": stored,
        "perplexity": result["model"]["metrics"]["perplexity"],
        "rel_error_mean": sum(m.rel_error for m in fac) / len(fac),
        "compress_s": seconds,
        "method": report.method if hasattr(report, "method") else "svd",
        "allocation": getattr(report, "allocation", None) or "uniform",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--data", type=Path, default=TEST)
    parser.add_argument("--only", type=int, nargs="*", help="indices of the part's settings to run")
    parser.add_argument(
        "--calibration", type=Path, default=None, help="calibration text (WikiText-2 valid); none: plain SVD"
    )
    parser.add_argument("--report", action="store_true", help="print markdown tables from the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.report:
        text = report()
        (DEFAULT_RESULTS / "precision.md").write_text(text)
        print(text)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    settings = PARTS[args.part]()
    if args.only:
        settings = [settings[i] for i in args.only]
    name = f"precision_{args.part}_{'calibrated' if args.calibration else 'svd'}"
    path = DEFAULT_RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    if args.calibration:
        cached_calibration(model, tokenizer, args.calibration)
    for setting in settings:
        row = run_setting(model, tokenizer, setting, args.data, args.calibration)
        logger.info("%s", row)
        rows = [r for r in rows if (r["bits"], r["recipe"]) != (row["bits"], row["recipe"])] + [row]
        write_results(name, {"model": str(args.model), "data": str(args.data), "rows": rows})


METHOD_TITLES = {"calibrated": "calibrated: whitening + global allocation", "svd": "plain SVD, no calibration"}


def _load(results: Path, name: str) -> dict | None:
    path = results / f"precision_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ppl(value: float) -> str:
    return f"{value:,.3f}" if value < 1e5 else f"{value:.2e}"


def report(results: Path = DEFAULT_RESULTS) -> str:
    """The BENCHMARKS.md fragment: the summary per size, then every measured row."""
    lines = [
        "## Stage precision: perplexity against bits per weight (issue 9)",
        "",
        "SmolLM2-135M (float32), WikiText-2 test, first 24 windows of 512 tokens, stride 512 (dense 27.44).",
        "Bits per weight = stored bytes of the targeted matrices (210 Linear layers; scales and zero",
        "points included) × 8 / their parameter count. Commands: `OMP_NUM_THREADS=1 python -m",
        "benchmarks.precision --part {levels,rtn,repair,stages} [--calibration wikitext-2.valid.txt]`,",
        "then `--report`. Every setting runs `svdlora.compress` on a fresh copy of the model.",
        "Recipes: `one bfloat16 stage` (`--stage-dtypes bfloat16`), `n int8 stages` (`int8`, n submatrices),",
        "`full-int4 + int8 repair` (`full-int4,int8`: the whole matrix in int4 group 128, then low-rank int8",
        "stages of its residual as stored), `RTN …` (`full-…` alone: plain round-to-nearest). Calibrated rows,",
        "when present, use the calibration issue's whitening and global allocation, statistics collected once",
        "on WikiText-2 valid. ViT and Marian rows are not here: their trained benchmark models are not cached",
        "on this machine.",
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
            multi = [r for r in rows if r["recipe"] != "one bfloat16 stage"]
            one = [r for r in rows if r["recipe"] == "one bfloat16 stage"]
            best = min(multi, key=lambda r: r["perplexity"]) if multi else None
            one_text = f"{one[0]['bits_per_weight']:.2f}: {_ppl(one[0]['perplexity'])}" if one else "not run"
            if best:
                lines.append(
                    f"| {bits} | {best['recipe']} | {best['bits_per_weight']:.2f} | {_ppl(best['perplexity'])} "
                    f"| {one_text} |"
                )
    for name, title in (
        ("rtn_svd", "Round-to-nearest weight quantization of the same matrices (what a user would pick instead)"),
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
            lines.append(
                f"| {r['bits'] or '-'} | {r['recipe']} | {','.join(r['stage_dtypes'])} × {r['n']} "
                f"| {r['bits_per_weight']:.2f} | {_ppl(r['perplexity'])} | {r['rel_error_mean']:.5f} "
                f"| {r['compress_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
