"""Load time and forward latency: dense original vs compressed (factorized and merged), one run.

    python -m benchmarks.load_time --dense ~/.cache/svdlora/SmolLM2-135M --compressed out/smollm2-svd

Repeats are interleaved (dense, factorized, merged, dense, ...) so that machine noise hits all
three alike; medians and ratios to the dense original are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from svdlora import load_compressed
from svdlora.models import default_device, load_pretrained

from .common import write_results


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _latency(model, device, tokens: int, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        model(ids)  # warm-up
        times = [_timed(lambda: model(ids))[1] for _ in range(repeats)]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="the original model folder")
    parser.add_argument("--compressed", required=True, help="its svdlora folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the latency probe")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = default_device(args.device)
    loaders = {
        "dense (transformers from_pretrained)": lambda: load_pretrained(args.dense).to(device).eval(),
        "svdlora factorized": lambda: load_compressed(args.compressed, device=device),
        "svdlora merged": lambda: load_compressed(args.compressed, device=device, merge=True),
    }
    load, latency = {k: [] for k in loaders}, {}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            model, seconds = _timed(loader)
            load[name].append(seconds)
            if name not in latency:
                latency[name] = _latency(model, device, args.tokens, args.repeats)
            del model
    dense = next(iter(loaders))
    rows = {
        name: {
            "load_s_median": statistics.median(times),
            "load_s_all": times,
            "load_ratio_to_dense": statistics.median(times) / statistics.median(load[dense]),
            "forward_s_median": latency[name],
            "forward_ratio_to_dense": latency[name] / latency[dense],
        }
        for name, times in load.items()
    }
    for name, row in rows.items():
        print(
            f"{name:<38} load {row['load_s_median']:.2f} s (x{row['load_ratio_to_dense']:.2f})   "
            f"forward[{args.tokens} tok] {row['forward_s_median'] * 1000:.0f} ms (x{row['forward_ratio_to_dense']:.2f})"
        )
    result = {
        "dense": args.dense,
        "compressed": args.compressed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_results("load_time", result)
    return result


if __name__ == "__main__":
    main()
