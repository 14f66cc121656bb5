"""Issue 8: does the compressed model still work? Every method side by side on SmolLM2-135M.

Protocol (fixed, so figures compare across time): WikiText-2 *test*, the first 24 windows of 512
tokens every 512 tokens, float32; calibration on WikiText-2 *valid* (never the test text), 64
windows of 512 tokens spread over it, or on 64 samples of 256 tokens the model writes itself
(``self``: no data). Statistics are collected once per calibration source and reused by every
row; a row's time is its compression plus its share of that collection (the "stats" column), so
the ratio to plain SVD is what a user would wait.

Rows, at each budget: plain SVD uniform (the sources' method), whitened uniform (SVD-LLM's
method), then our additions one by one (Fisher output weights, global allocation, refit to the
compressed model's own inputs) and combined, and the data-free default (self-generated text).
Healing rows (budget 0.5): the default row's model healed by distillation from the dense model for
``--heal-seconds``, and by the LM loss on the calibration text, with the dense model given the
same fine-tune as its control. A healed row's time is its compression plus its healing.

Usage:
    python -m benchmarks.quality --wikitext /path/wikitext-2 [--budgets 0.8 0.6 0.5] [--heal-seconds 600]
    python -m benchmarks.quality --quick     # a few minutes: 8 calibration windows, 4 test windows
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import svdlora
from benchmarks.common import DEFAULT_CACHE, machine_info, smollm2_folder, targeted_bits_per_weight, write_results
from benchmarks.data import DEFAULT_DATA, require
from svdlora.calibration import collect_statistics
from svdlora.calibration_data import SELF, calibration_batches
from svdlora.config import CompressionConfig
from svdlora.heal import heal
from svdlora.targets import find_targets

NAME = "quality"
PROMPT = "What is the capital of France?"  # the README demo's question
# (row label, method, allocation, refit, calibration source, more compress options)
DEFAULT_ROW = "kfac + global + pivoted factors (PIFA)"  # svdlora's default with calibration data
PIVOT = {"pivot": True}
QUANTIZED = {"stage_dtypes": ["full-int4", "int8"], "submatrices": 2}  # issue 9's recipe: budget = bits / 32
ROWS = [
    ("plain SVD, uniform (sources)", "svd", "uniform", False, None, {}),
    ("whitened, uniform (SVD-LLM)", "whiten", "uniform", False, "valid", {}),
    ("+ Fisher output weights", "fisher", "uniform", False, "valid", {}),
    ("+ global allocation", "fisher", "global", False, "valid", {}),
    ("whitened + refit", "whiten", "uniform", True, "valid", {}),
    ("Fisher + global + refit (16 samples)", "fisher", "global", True, "valid", {}),
    ("no data: self-generated text, Fisher + global", "fisher", "global", False, "self", {}),
    ("Kronecker-factored Fisher (kfac) + global", "kfac", "global", False, "valid-kfac", {}),
    ("no data: self-generated text, kfac + global", "kfac", "global", False, "self-kfac", {}),
    (DEFAULT_ROW, "kfac", "global", False, "valid-kfac", PIVOT),
    ("no data: self-generated text, kfac + global + pivoted (default)", "kfac", "global", False, "self-kfac", PIVOT),
    ("plain SVD, uniform, pivoted factors", "svd", "uniform", False, None, PIVOT),
    ("kfac + global, full-int4 + int8 repair (budget in bytes)", "kfac", "global", False, "valid-kfac", QUANTIZED),
    (
        "no data: kfac + global, full-int4 + int8 repair (budget in bytes)",
        "kfac",
        "global",
        False,
        "self-kfac",
        QUANTIZED,
    ),  # fmt: skip
]
logger = logging.getLogger(__name__)


def perplexity(model, tokenizer, test: Path, limit: int, device: str) -> float:
    result = svdlora.evaluate(
        (model, tokenizer), "text-generation", test, limit=limit, max_length=512, stride=512,
        device=device, progress=False,
    )  # fmt: skip
    return result["model"]["metrics"]["perplexity"]


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """The greedy answer to ``prompt`` through the chat template (as examples/generate.py asks)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def calibration_source(model, tokenizer, which: str, args) -> tuple[list[dict], dict, float]:
    """Batches and their statistics (collected once on the dense model), with the seconds they took.

    Cached in ``--cache-dir`` so that a run resumed with other ``--budgets`` / ``--rows`` reuses them
    (the cached collection time is reported, not the load time).
    """
    cache = args.cache_dir / f"stats-{which}-{args.samples}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)  # written by this script
    start = time.perf_counter()
    data = SELF if which.startswith("self") else args.wikitext / "wikitext-2.valid.txt"
    length = 256 if which.startswith("self") else 512
    base = args.cache_dir / f"stats-{which.removesuffix('-kfac')}-{args.samples}.pt"
    if which == "self-kfac" and base.is_file():
        # the same batches (self-generated text takes long to write again); the time reported is that
        # source's whole time plus this collection, so it over-counts one (diagonal) statistics pass
        batches, _, base_seconds = torch.load(base, weights_only=False)
        start -= base_seconds
    else:
        batches = calibration_batches(model, data, tokenizer, args.samples, length, progress=True)
    targets, _ = find_targets(model, CompressionConfig())
    # "-kfac": the same data, with the (out, out) output-gradient Grams method "kfac" needs
    stats = collect_statistics(model, targets, batches, progress=True, output_gram=which.endswith("-kfac"))
    source = (batches, stats, time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source, cache)
    return source


def dense_perplexity(dense, tokenizer, test: Path, args) -> float:
    cache = args.cache_dir / f"dense-{args.limit}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["perplexity"]
    ppl = perplexity(dense, tokenizer, test, args.limit, args.device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"perplexity": ppl}))
    return ppl


def compress_row(dense, tokenizer, budget, method, allocation, refit, source, args, **extra):
    model = copy.deepcopy(dense)
    batches, stats, stat_seconds = source if source else (None, None, 0.0)
    start = time.perf_counter()
    report = svdlora.compress(
        model, budget=budget, method=method, allocation=allocation, refit=refit,
        calibration=batches, statistics=stats, progress=False, **extra,
    )  # fmt: skip
    seconds = time.perf_counter() - start + stat_seconds
    return model, report, seconds


def quality_arguments(p: argparse.ArgumentParser) -> None:
    """The protocol's model, data and statistics cache (shared with ``benchmarks.heal_sweep``)."""
    p.add_argument(
        "--model", type=Path, default=smollm2_folder(), help="SmolLM2-135M folder (scripts/fetch_smollm2.sh)"
    )
    p.add_argument("--wikitext", type=Path, default=DEFAULT_DATA / "text", help="folder of wikitext-2.{valid,test}.txt")
    p.add_argument("--samples", type=int, default=64, help="calibration windows / self-generated samples")
    p.add_argument("--name", default=NAME, help="results file name (benchmarks/results/NAME.json)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE / "quality", help="statistics cache")


def require_quality_inputs(args: argparse.Namespace) -> None:
    """The model and text folders of ``quality_arguments``, refused by flag where they do not exist."""
    require({"--model": args.model, "--wikitext": args.wikitext})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5, 0.6], help="in the order run")
    p.add_argument("--limit", type=int, default=24, help="test windows of 512 tokens")
    p.add_argument("--heal-seconds", type=float, default=600, help="healing time limit (0: no healing rows)")
    p.add_argument("--heal-budget", type=float, default=0.5)
    p.add_argument("--heal-losses", nargs="+", default=["distill", "lm"], choices=["distill", "lm"],
                   help="healing rows to run; 'lm' also runs the dense control with the same fine-tune")  # fmt: skip
    p.add_argument("--rows", nargs="+", type=int, default=None, help="only these rows (indices into ROWS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    require_quality_inputs(args)
    if args.quick:
        args.samples, args.limit, args.budgets, args.heal_seconds, args.heal_budget = 8, 4, [0.8], 30, 0.8
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    test = args.wikitext / "wikitext-2.test.txt"
    results = {"protocol": vars(args) | {"model": str(args.model), "wikitext": str(args.wikitext)}, "rows": []}
    results["protocol"] = {k: str(v) if isinstance(v, Path) else v for k, v in results["protocol"].items()}
    dense_ppl = dense_perplexity(dense, tokenizer, test, args)
    results["dense_perplexity"] = dense_ppl
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)
    rows = [ROWS[i] for i in args.rows] if args.rows is not None else ROWS  # in the order given
    sources = {}
    results["stats_seconds"] = {}

    def source(which):  # collected on first use, so the rows given first run first
        if which and which not in sources:
            sources[which] = calibration_source(dense, tokenizer, which, args)
            results["stats_seconds"][which] = sources[which][2]
            print(f"statistics from {which}: {sources[which][2]:.1f} s", flush=True)
        return sources.get(which)

    def record(label, budget, ppl, seconds, report=None, **more):
        row = {"setting": label, "budget": budget, "perplexity": ppl, "x_dense": ppl / dense_ppl, "seconds": seconds}
        if report is not None:
            row["model_params"] = report.model_params_after
            row["dense_layers"] = sum(1 for m in report.modules if not m.factorized)
            row["bits_per_weight"] = targeted_bits_per_weight(report)
        row.update(more)
        results["rows"].append(row)
        print(
            f"{budget:4.2f}  {label:42s} ppl {ppl:10.2f}  ({ppl / dense_ppl:6.2f}x dense)  {seconds:7.1f} s", flush=True
        )
        write_results(args.name, results)

    for budget in args.budgets:
        for label, method, allocation, refit, which, options in rows:
            model, report, seconds = compress_row(
                dense, tokenizer, budget, method, allocation, refit, source(which), args, **options
            )
            ppl = perplexity(model, tokenizer, test, args.limit, args.device)
            record(label, budget, ppl, seconds, report, answer=answer(model, tokenizer, PROMPT))
            if label == DEFAULT_ROW and budget == args.heal_budget and args.heal_seconds:
                heal_rows(model, report, seconds, dense, tokenizer, test, sources[which][0], args, record, label)
            del model
    path = write_results(args.name, results)
    print(json.dumps(machine_info()), f"\nwrote {path}")
    return 0


def heal_rows(model, report, seconds, dense, tokenizer, test, batches, args, record, row) -> None:
    """Healing of the default row's model: distillation from the dense model, the LM loss, and the
    dense model given the same LM fine-tune (its control); each for ``--heal-seconds``."""
    steps = 100_000  # the time limit decides
    copies = {loss: copy.deepcopy(model) for loss in args.heal_losses}
    for loss, student in copies.items():
        teacher = dense if loss == "distill" else None
        healed = heal(student, batches, steps, teacher=teacher, loss=loss, seconds=args.heal_seconds)
        ppl = perplexity(student, tokenizer, test, args.limit, args.device)
        label = f"{row} + healing ({loss}, {args.heal_seconds:.0f} s)"
        said = answer(student, tokenizer, PROMPT)
        record(label, args.heal_budget, ppl, seconds + healed.seconds, report, heal=healed.to_dict(), answer=said)
    if "lm" not in args.heal_losses:
        return
    control = copy.deepcopy(dense)
    healed = heal(control, batches, steps, loss="lm", seconds=args.heal_seconds, parameters=list(control.parameters()))
    ppl = perplexity(control, tokenizer, test, args.limit, args.device)
    record(f"dense model + the same LM fine-tune (control, {args.heal_seconds:.0f} s)", 1.0, ppl,
           healed.seconds, heal=healed.to_dict())  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
