"""Adapter extraction on a real fine-tune: held-out perplexity of base, tuned and base + adapter per budget.

The fine-tune comes from ``benchmarks.finetune_smollm2`` (SmolLM2-135M on the first 90% of Tiny
Shakespeare); its folder holds ``heldout.txt``, the last 10%, never trained on. For each budget
(the fraction of the changed Linear matrices' parameters the LoRA factors may hold) the adapter
is written by ``svdlora.integrations.peft_adapter.write_adapter`` (plain SVD of the delta, the
norms as ``modules_to_save``), loaded with ``peft.PeftModel.from_pretrained(base, folder)``, and
evaluated with ``svdlora.evaluate`` on the held-out text. For contrast, the tuned model itself is
compressed whole (``svdlora.compress``) at ``--whole-budgets``.

``--methods whiten`` (or ``fisher``) adds calibration-aware adapters: the tuned model runs on
``--calibration-samples`` windows of the *training* part of ``--calibration`` (the same 90/10 split
as the fine-tune, checked against ``heldout.txt``, so no evaluated token is calibrated on); the
statistics are collected once and reused for every budget.

    OMP_NUM_THREADS=1 python -m benchmarks.extract_adapters --base /root/.cache/svdlora/SmolLM2-135M \
        --tuned .cache/smollm2-shakespeare --budgets 0.01,0.03,0.1,0.3 --whole-budgets 0.5 --limit 16
    OMP_NUM_THREADS=1 python -m benchmarks.extract_adapters --base /root/.cache/svdlora/SmolLM2-135M \
        --tuned .cache/smollm2-shakespeare --budgets 0.01,0.03,0.1,0.3 --whole-budgets "" --limit 16 \
        --methods whiten --calibration /work/shared/data/text/tinyshakespeare.txt --name extract_adapters_calibrated
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import svdlora
from svdlora.calibration import collect_statistics
from svdlora.calibration_data import calibration_batches
from svdlora.config import CompressionConfig
from svdlora.decompose import relative_error
from svdlora.integrations.peft_adapter import ADAPTER_WEIGHTS, write_adapter
from svdlora.layers import weight_out_in
from svdlora.methods import Weighting
from svdlora.targets import find_targets

from .common import write_results
from .finetune_smollm2 import split_heldout


def calibration_text(source: Path, heldout: Path, folder: Path) -> Path:
    """The training part of ``source`` as a file; refuses when the split does not give ``heldout``."""
    train, tail = split_heldout(source.read_text())
    if tail != heldout.read_text():
        raise SystemExit(f"{source} does not split into {heldout}: pass the text the fine-tune was made from")
    path = folder / "calibration-train-part.txt"
    path.write_text(train)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True, help="folder from benchmarks.finetune_smollm2 (holds heldout.txt)")
    p.add_argument("--budgets", default="0.01,0.03,0.1,0.3")
    p.add_argument("--whole-budgets", default="0.5")
    p.add_argument("--submatrices", type=int, default=1)
    p.add_argument("--limit", type=int, default=16, help="windows of --max-length tokens evaluated")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--methods", default="svd", help="comma list of svd, whiten, fisher")
    p.add_argument("--calibration", type=Path, help="the fine-tune's source text (its training part is used)")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-length", type=int, default=512)
    p.add_argument("--name", default="extract_adapters", help="results file name (benchmarks/results/NAME.json)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    import peft

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    heldout = Path(args.tuned) / "heldout.txt"
    tok = transformers.AutoTokenizer.from_pretrained(args.tuned)
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(args.base, dtype=torch.float32).eval()
    tuned = load(args.tuned, dtype=torch.float32).eval()
    settings = {"max_length": args.max_length, "stride": args.max_length, "limit": args.limit, "device": "cpu"}

    def ppl(model) -> float:
        result = svdlora.evaluate((model, tok), task="text-generation", data=str(heldout), progress=False, **settings)
        return result["model"]["metrics"]["perplexity"]

    rows = {"base": {"perplexity": ppl(base)}, "tuned": {"perplexity": ppl(tuned)}}
    print(rows, flush=True)
    dense_bytes = sum(f.stat().st_size for f in Path(args.tuned).glob("model*.safetensors"))
    calibration = None
    with tempfile.TemporaryDirectory() as tmp:
        batches, stats = None, None
        if any(m != "svd" for m in methods):
            if args.calibration is None:
                raise SystemExit("--methods whiten/fisher need --calibration (the fine-tune's source text)")
            text = calibration_text(args.calibration, heldout, Path(tmp))
            start = time.perf_counter()
            batches = calibration_batches(
                tuned, str(text), tok, args.calibration_samples, args.calibration_length, progress=False
            )
            targets, _ = find_targets(tuned, CompressionConfig())
            stats = collect_statistics(tuned, targets, batches, gradients="fisher" in methods, progress=False)
            calibration = {
                "source": f"{args.calibration} (training part: first {text.stat().st_size:,} characters)",
                "windows": len(batches),
                "tokens": sum(int(b["input_ids"].numel()) for b in batches),
                "gradients": "fisher" in methods,
                "seconds": time.perf_counter() - start,
            }
            print("calibration", calibration, flush=True)
        for method in methods:
            for budget in [float(b) for b in args.budgets.split(",")]:
                key = f"adapter@{budget}" if method == "svd" else f"adapter-{method}@{budget}"
                rows[key] = adapter_row(base, tuned, Path(tmp) / key, budget, method, args, batches, stats, ppl, peft)
                print(key, rows[key], flush=True)
    for budget in [float(b) for b in args.whole_budgets.split(",") if b]:
        model = copy.deepcopy(tuned)
        report = svdlora.compress(model, budget=budget, submatrices=args.submatrices, progress=False)
        rows[f"whole@{budget}"] = {
            "budget": budget,
            "perplexity": ppl(model),
            "model_params_after": report.model_params_after,
            "model_params_before": report.model_params_before,
        }
        print(budget, rows[f"whole@{budget}"], flush=True)
        del model
    command = "OMP_NUM_THREADS=1 python -m benchmarks.extract_adapters " + shlex.join(argv or sys.argv[1:])
    data = {"command": command, "settings": {**settings, "submatrices": args.submatrices}, "rows": rows,
            "tuned_model_bytes": dense_bytes, "calibration": calibration}  # fmt: skip
    path = write_results(args.name, data)
    print(f"wrote {path}")
    return rows


def output_errors(base, tuned, extraction, stats) -> list[float]:
    """‖(ΔW − BA)·S‖ / ‖ΔW·S‖ per module, S the whitening of the tuned model's layer inputs."""
    cache: dict[int, Weighting] = {}
    errors = []
    for m in extraction.lora:
        gram = stats[m.name].gram
        weighting = cache.setdefault(id(gram), Weighting.from_stats(stats[m.name], use_gradients=False))
        delta = weight_out_in(tuned.get_submodule(m.name)).double() - weight_out_in(base.get_submodule(m.name)).double()
        approx = m.lora_B.double() @ m.lora_A.double()
        errors.append(relative_error(weighting.whiten(delta), weighting.whiten(approx)))
    return errors


def adapter_row(base, tuned, folder, budget, method, args, batches, stats, ppl, peft) -> dict:
    start = time.perf_counter()
    extraction = write_adapter(
        base, tuned, folder, budget=budget, submatrices=args.submatrices, method=method,
        calibration=batches if method != "svd" else None, statistics=stats, progress=False,
        base_name=args.base, tuned_name=args.tuned,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    errors = [m.rel_error for m in extraction.lora]
    weighted = [m.weighted_error for m in extraction.lora if m.weighted_error is not None]
    if method == "svd" and stats:  # the plain factors measured in the calibrated metric, for comparison
        weighted = output_errors(base, tuned, extraction, stats)
    return {
        "budget": budget,
        "perplexity": ppl(model),
        "adapter_bytes": (folder / ADAPTER_WEIGHTS).stat().st_size,
        "lora_params": extraction.lora_params,
        "delta_params": extraction.delta_params,
        "modules_to_save": len(extraction.modules_to_save),
        "modules_to_save_params": extraction.modules_to_save_params,
        "ranks": sorted({m.rank for m in extraction.lora}),
        "delta_rel_error_mean": sum(errors) / len(errors),
        "delta_rel_error_max": max(errors),
        "extract_seconds": seconds,
        "method": method,
        "output_rel_error_mean": sum(weighted) / len(weighted) if weighted else None,
    }


if __name__ == "__main__":
    main()
