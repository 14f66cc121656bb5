"""Seconds to collect the kfac calibration statistics of a causal LM in memory (``collect_statistics``
with output Grams: the default method's), optionally with torch.profiler's top operators.

    OMP_NUM_THREADS=1 python -m benchmarks.statistics_speed --model ~/.cache/svdlora/SmolLM2-135M \\
        --text /work/shared/data/text/wikitext-2.valid.txt [--windows 3] [--profile]

To compare two versions of svdlora, run this file with PYTHONPATH set to each checkout in turn.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from svdlora.calibration import collect_statistics
from svdlora.calibration_data import calibration_batches
from svdlora.config import CompressionConfig
from svdlora.targets import find_targets


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="calibration text (WikiText-2 valid)")
    p.add_argument("--windows", type=int, default=3, help="windows of 512 tokens")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    batches = calibration_batches(model, args.text, tokenizer, args.windows, 512, seed=0, progress=False, device="cpu")
    targets, _ = find_targets(model, CompressionConfig(budget=0.5))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            collect_statistics(model, targets, batches, progress=False, output_gram=True)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    start = time.perf_counter()
    collect_statistics(model, targets, batches, progress=False, output_gram=True)
    seconds = time.perf_counter() - start
    print(f"{args.windows} windows: {seconds:.1f} s (torch threads {torch.get_num_threads()})")
    return seconds


if __name__ == "__main__":
    main()
