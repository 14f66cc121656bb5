"""Issue 8 on the benchmarks' other models: calibration-aware compression of the ViT (CIFAR-10,
top-1 accuracy) and the Marian translator (Multi30k de→en, BLEU / chrF), side by side with
plain SVD, at budgets 0.3, 0.5 and 0.8.

Calibration never touches the test split: the ViT calibrates on ``--calibration-samples`` training
images, the translator on training source sentences (its own greedy translations are the targets).
Statistics are collected once per model and shared by the rows, as in ``benchmarks.quality``.

Usage:
    python -m benchmarks.quality_models --vit .cache/benchmarks/vit-cifar10 \\
        --cifar-train .cache/benchmarks/cifar10-jpg/train --cifar-test .cache/benchmarks/cifar10-jpg/test
    python -m benchmarks.quality_models --marian .cache/benchmarks/marian-multi30k
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, AutoTokenizer, MarianMTModel

import svdlora
from benchmarks.common import write_results
from benchmarks.data import DEFAULT_DATA, require
from svdlora.calibration import collect_statistics
from svdlora.calibration_data import calibration_batches
from svdlora.config import CompressionConfig
from svdlora.evaluation.loading import load_processor
from svdlora.targets import find_targets

NAME = "quality_models"
BUDGETS = (0.8, 0.5, 0.3)
# (row label, method, allocation, refit, calibrated, pivoted factors)
ROWS = [
    ("plain SVD, uniform (sources)", "svd", "uniform", False, False, False),
    ("whitened, uniform (SVD-LLM)", "whiten", "uniform", False, True, False),
    ("+ Fisher output weights", "fisher", "uniform", False, True, False),
    ("+ global allocation", "fisher", "global", False, True, False),
    ("Kronecker-factored Fisher (kfac) + global", "kfac", "global", False, True, False),
    ("Fisher + global + refit", "fisher", "global", True, True, False),
    ("kfac + global + pivoted factors (PIFA)", "kfac", "global", False, True, True),  # the CLI's default
]


def side_by_side(name, dense, processor, calibration_data, evaluate, args, results) -> None:
    """Every row at every budget for one model; ``evaluate(model)`` returns a dict of metrics."""
    start = time.perf_counter()
    batches = calibration_batches(dense, calibration_data, processor, args.calibration_samples, 128)
    targets, _ = find_targets(dense, CompressionConfig())
    # with the output-gradient Grams of method kfac: a superset of what the other rows use
    stats = collect_statistics(dense, targets, batches, progress=True, output_gram=True)
    stat_seconds = time.perf_counter() - start
    entry = {"dense": evaluate(dense), "stats_seconds": stat_seconds, "calibration": str(calibration_data), "rows": []}
    results[name] = entry
    print(name, "dense", entry["dense"], flush=True)
    rows = [ROWS[i] for i in args.rows] if args.rows is not None else ROWS
    for budget in args.budgets:
        for label, method, allocation, refit, calibrated, pivot in rows:
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            svdlora.compress(
                model, budget=budget, method=method, allocation=allocation, refit=refit,
                calibration=batches if calibrated else None, statistics=stats if calibrated else None,
                pivot=pivot, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t + (stat_seconds if calibrated else 0.0)
            row = {"setting": label, "budget": budget, "seconds": seconds, **evaluate(model)}
            entry["rows"].append(row)
            print(name, f"{budget:.1f}", label, {k: v for k, v in row.items() if k not in ("setting", "budget")},
                  flush=True)  # fmt: skip
            write_results(args.name, results)


def vit_setup(args):
    """(dense ViT, its processor, calibration images, evaluate(model) -> {"accuracy"})."""
    require({"--cifar-test": args.cifar_test})  # no default: the extracted folder is not in ../shared/data
    processor = load_processor(args.vit, "image-classification")
    dense = AutoModelForImageClassification.from_pretrained(args.vit).eval()

    def evaluate(model):
        r = svdlora.evaluate((model, processor), "image-classification", args.cifar_test, limit=args.limit,
                             progress=False)  # fmt: skip
        return {"accuracy": r["model"]["metrics"]["accuracy"]}

    return dense, processor, args.cifar_train, evaluate


def marian_setup(args):
    """(dense Marian, its tokenizer, calibration sources, evaluate(model) -> {"bleu", "chrf"})."""
    require({"--test-src": args.test_src, "--test-tgt": args.test_tgt})
    tokenizer = AutoTokenizer.from_pretrained(args.marian)
    dense = MarianMTModel.from_pretrained(args.marian).eval()

    def evaluate(model):
        r = svdlora.evaluate((model, tokenizer), "translation", args.test_src, references=args.test_tgt,
                             limit=args.sentences, num_beams=4, max_new_tokens=64, batch_size=50,
                             progress=False)  # fmt: skip
        metrics = r["model"]["metrics"]
        return {"bleu": metrics["bleu"], "chrf": metrics["chrf"]}

    return dense, tokenizer, args.train_src, evaluate


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The ViT / Marian options shared with ``benchmarks.precision_models``."""
    m30k = DEFAULT_DATA / "multi30k"
    p.add_argument("--vit", type=Path, help="ViT folder (benchmarks.train_vit)")
    p.add_argument("--cifar-train", type=Path, help="CIFAR-10 training image folder (calibration)")
    p.add_argument("--cifar-test", type=Path, help="CIFAR-10 test image folder")
    p.add_argument("--limit", type=int, default=2000, help="test images")
    p.add_argument("--marian", type=Path, help="Marian folder (benchmarks.train_marian)")
    p.add_argument("--train-src", type=Path, default=m30k / "train.de.gz")
    p.add_argument("--test-src", type=Path, default=m30k / "test_2016_flickr.de.gz")
    p.add_argument("--test-tgt", type=Path, default=m30k / "test_2016_flickr.en.gz")
    p.add_argument("--sentences", type=int, default=300, help="test sentences")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--rows", nargs="+", type=int, default=None, help="only these rows (indices into ROWS)")
    p.add_argument("--name", default=NAME)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = {"command": "python -m benchmarks.quality_models " + " ".join(sys.argv[1:] if argv is None else argv)}
    # The calibration sources: precision_models, plain SVD, shares the setups but not these.
    require(
        ({"--cifar-train": args.cifar_train} if args.vit else {})
        | ({"--train-src": args.train_src} if args.marian else {})
    )
    if args.vit:
        side_by_side("vit", *vit_setup(args), args, results)
    if args.marian:
        side_by_side("marian", *marian_setup(args), args, results)
    print("wrote", write_results(args.name, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
