"""Can streamed calibration allocate ranks globally without gradients? (issue 10, item 1)

    OMP_NUM_THREADS=1 python -m benchmarks.gradient_free_allocation --dense ~/.cache/svdlora/SmolLM2-135M \
        --wikitext /work/shared/data/text [--budget 0.5] [--json benchmarks/results/gradient_free_allocation.json]

Global allocation (the in-memory default) compares the matrices' spectra weighted by the loss
gradient at each layer's output, which needs a backward pass through the whole model. Block by
block, only the whitened spectra (σ of W·S, S·Sᵀ = E[x xᵀ]) are at hand. This compresses
SmolLM2-135M with whitening (pivoted, the CLI default form) at one budget under three rank
choices, calibrated on WikiText-2 *valid* (64 windows of 512 tokens), and measures perplexity on
issue 8's protocol (WikiText-2 *test*, first 24 windows of 512 tokens, float32):
  - uniform: every matrix keeps the same share (what streamed calibration does);
  - whitened spectra: the global greedy on σ² (output-activation error, each layer in its own unit);
  - relative spectra: the same on σ²/Σσ² (each layer's relative output error).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from pathlib import Path

import torch
import transformers

from svdlora import CompressionConfig
from svdlora.allocate import allocate_global
from svdlora.calibration import collect_statistics
from svdlora.calibration_data import calibration_batches
from svdlora.layers import weight_out_in
from svdlora.methods import weighted_spectrum
from svdlora.plan import CalibrationPlan
from svdlora.targets import find_targets

from .common import write_results
from .quality import perplexity

compress_module = importlib.import_module("svdlora.compress")  # the package exports compress(), the function


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, required=True)
    p.add_argument("--wikitext", type=Path, required=True, help="folder with wikitext-2.{valid,test}.txt")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.dense))
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(args.dense), dtype=torch.float32).eval()
    config = CompressionConfig(budget=args.budget, method="whiten", allocation="uniform", pivot=True)
    valid, test = args.wikitext / "wikitext-2.valid.txt", args.wikitext / "wikitext-2.test.txt"
    batches = calibration_batches(dense, valid, tokenizer, args.samples, 512, progress=False)
    targets, _ = find_targets(dense, config)
    stats = collect_statistics(dense, targets, batches, gradients=False, progress=False)
    weighting = CalibrationPlan("whiten", "uniform", stats=stats).weighting
    whitened = {t.name: weighted_spectrum(weight_out_in(t.module), weighting(t.name)) for t in targets}
    choices = {
        "uniform": None,
        "whitened spectra": whitened,
        "relative spectra": {n: s / s.square().sum().sqrt() for n, s in whitened.items()},
    }
    rows = {}
    for name, spectra in choices.items():
        model = copy.deepcopy(dense)
        original = compress_module.allocate
        if spectra is not None:
            ranks, kept, _ = allocate_global(targets, spectra, args.budget, 1, pivot=True)
            compress_module.allocate = lambda *a, ranks=ranks, kept=kept, **k: (ranks, kept, {})
        try:
            report = compress_module.compress(model, config, calibration=batches, statistics=stats, progress=False)
        finally:
            compress_module.allocate = original
        rows[name] = {
            "perplexity": perplexity(model, tokenizer, test, args.limit, "cpu"),
            "kept_dense": sum(1 for m in report.modules if m.dense_reason),
            "params_after": report.model_params_after,
        }
        print(f"{name}: perplexity {rows[name]['perplexity']:.2f}", flush=True)
    dense_ppl = perplexity(dense, tokenizer, test, args.limit, "cpu")
    data = {
        "command": "python -m benchmarks.gradient_free_allocation " + " ".join(argv or sys.argv[1:]),
        "budget": args.budget,
        "dense_perplexity": dense_ppl,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        write_results(args.json.stem, data, args.json.parent)
    print(f"\n| rank choice (whitened, budget {args.budget}) | perplexity (× dense {dense_ppl:.2f}) | params after |")
    print("| --- | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['perplexity']:.4g} ({row['perplexity'] / dense_ppl:.3g}×) | {row['params_after']:,} |")


if __name__ == "__main__":
    main()
