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
        print(report())
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


def report(results: Path = DEFAULT_RESULTS) -> str:
    lines = []
    for part in ("rtn_svd", "levels_svd", "repair_svd", "levels_calibrated", "stages_calibrated", "repair_calibrated"):
        path = results / f"precision_{part}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        lines += [
            f"\n{part} ({data['machine']['date']}, {data['machine']['platform']}, torch threads "
            f"{data['machine']['torch_threads']}):\n",
            "| target bits | recipe | stage dtypes | bits/weight | perplexity | rel. error | compress s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            lines.append(
                f"| {r['bits'] or '-'} | {r['recipe']} | {','.join(r['stage_dtypes'])} x{r['n']} "
                f"| {r['bits_per_weight']:.2f} | {r['perplexity']:.2f} | {r['rel_error_mean']:.4f} "
                f"| {r['compress_s']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
