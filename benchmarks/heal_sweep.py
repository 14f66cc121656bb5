"""Choose healing's learning rate without looking at the test text (issue 8).

The healing rows of ``benchmarks.quality`` report test perplexity; picking their learning rate
on those figures would fit the test set. This sweep compresses SmolLM2-135M once (the quality
protocol's calibration statistics, from its cache), heals a copy for ``--seconds`` at each peak
rate, and records only the distillation loss on the calibration batches (of the first 8 steps as
trained, then of the healed model on the same batches; the recorded results before 2026-11-29 hold
the last 8 steps' own) and on ``--holdout`` WikiText-2 *valid* windows that calibration did not use.

Usage:
    python -m benchmarks.heal_sweep --budget 0.5 --method kfac --lrs 1e-4 3e-4 1e-3 --seconds 120
"""

from __future__ import annotations

import argparse
import copy
import json
import logging

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import svdlora
from benchmarks.common import machine_info, write_results
from benchmarks.quality import calibration_source, quality_arguments, require_quality_inputs
from svdlora.heal import heal

NAME = "heal_sweep"


DEFAULT_LRS = [1e-4, 3e-4, 1e-3]  # peak healing rates tried


def holdout_loss(student, teacher, batches) -> float:
    """Mean per-token KL(teacher ‖ student) on batches healing never saw."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
            kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            total, tokens = total + kl.sum().item(), tokens + kl.numel()
    return total / tokens


def holdout_windows(tokenizer, path, samples: int, count: int, length: int = 512) -> list[dict]:
    """``count`` windows of valid text between the ``samples`` calibration windows, which are spread
    evenly over it (``calibration_data``): each starts half a spacing after one, so none overlaps."""
    ids = tokenizer(path.read_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    spacing = (ids.numel() - length) / (samples - 1)
    assert spacing / 2 >= length, "calibration windows too dense to hold windows out between them"
    gaps = torch.linspace(0, samples - 2, count).round().long().tolist()
    return [{"input_ids": ids[int(spacing * (g + 0.5)) :][:length][None]} for g in gaps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--method", default="fisher", choices=["fisher", "kfac"])
    p.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS)
    p.add_argument("--seconds", type=float, default=120, help="healing time per rate")
    p.add_argument("--holdout", type=int, default=8, help="valid windows held out, between the calibration windows")
    p.add_argument("--pivot", action="store_true", help="pivoted factors, as `svdlora compress` stores them by default")
    p.set_defaults(name=NAME)
    args = p.parse_args(argv)
    require_quality_inputs(args)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    which = "valid-kfac" if args.method == "kfac" else "valid"
    batches, stats, _ = calibration_source(dense, tokenizer, which, args)
    holdout = holdout_windows(tokenizer, args.wikitext / "wikitext-2.valid.txt", args.samples, args.holdout)
    compressed = copy.deepcopy(dense)
    svdlora.compress(compressed, budget=args.budget, method=args.method, calibration=batches, statistics=stats,
                     pivot=args.pivot, progress=False)  # fmt: skip
    results = {"protocol": {k: str(v) for k, v in vars(args).items()}, "holdout_windows": len(holdout), "rows": []}
    results["holdout_kl_before"] = holdout_loss(compressed, dense, holdout)
    print(f"held-out KL before healing {results['holdout_kl_before']:.4f}", flush=True)
    for lr in args.lrs:
        student = copy.deepcopy(compressed)
        healed = heal(student, batches, 100_000, teacher=dense, seconds=args.seconds, lr=lr, progress=False)
        row = {"lr": lr, "heal": healed.to_dict(), "holdout_kl": holdout_loss(student, dense, holdout)}
        results["rows"].append(row)
        print(f"lr {lr:g}: {healed.steps} steps, train KL {healed.first_loss:.4f} -> {healed.last_loss:.4f}, "
              f"held-out KL {row['holdout_kl']:.4f}", flush=True)  # fmt: skip
        write_results(args.name, results)
    print(json.dumps(machine_info()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
