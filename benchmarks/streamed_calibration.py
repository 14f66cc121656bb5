"""Streamed calibration (issue 10, item 1): one decoder block at a time against in memory.

    OMP_NUM_THREADS=1 python -m benchmarks.streamed_calibration --dense ~/.cache/svdlora/SmolLM2-135M \
        --wikitext /work/shared/data/text --work /tmp/streamed-calibration \
        [--budget 0.5] [--with-default] [--json benchmarks/results/streamed_calibration.json]

Fresh `svdlora compress` processes at one budget, calibrated on WikiText-2 *valid* (the CLI's
default 64 windows of 512 tokens), one at a time:
  - plain SVD, streamed (`--stream --calibration none`: what streaming gave before);
  - whitened, streamed block by block (`--stream --calibration VALID --method whiten --allocation
    uniform`: one forward pass);
  - whitened in memory (`--calibration VALID --method whiten --allocation uniform`), whose weight
    files must equal the streamed ones byte for byte;
  - with --with-default, the default method and allocation (kfac + global allocation), streamed
    (`--stream --calibration VALID`: a forward and a backward pass block by block, every block's
    inputs on disk meanwhile) and in memory (`--calibration VALID`: gradients through the whole
    model), whose files must be equal too (~25 minutes more on 2 cores).
Each row: wall time, the peak RSS the CLI prints, and perplexity on issue 8's protocol
(WikiText-2 *test*, the first 24 windows of 512 tokens, float32), beside the dense model's.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
from pathlib import Path

import torch
import transformers

import svdlora

from .common import peak_rss_mb, timed_run, write_results
from .quality import perplexity


def compress(dense: Path, out: Path, flags: list[str], launcher: list[str] | None = None) -> dict:
    """One fresh CLI command (``launcher``: e.g. torchrun's, default one process); its wall time and
    the peak RSS it prints (the largest process's under a launcher)."""
    launcher = launcher or [sys.executable, "-m", "svdlora"]
    argv = [*launcher, "compress", str(dense), "-o", str(out), "--overwrite", "--no-progress"]
    seconds, _, err = timed_run([*argv, *flags], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {"flags": flags, "seconds": round(seconds, 1), "peak_rss_mb": int(peak_rss_mb(err))}


def dense_perplexity(dense: Path, test: Path, limit: int):
    """The dense model's tokenizer and its perplexity on issue 8's protocol (float32, CPU)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(dense))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    return tokenizer, perplexity(model, tokenizer, test, limit, "cpu")


def folder_perplexity(folder: Path, tokenizer, test: Path, limit: int) -> float:
    """A compressed folder's perplexity on the same protocol (loaded in float32 on the CPU)."""
    model = svdlora.load_compressed(folder, device="cpu", dtype=torch.float32)
    return perplexity(model, tokenizer, test, limit, "cpu")


def same_weights(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if "safetensors" in p.name)
    return names == sorted(p.name for p in b.iterdir() if "safetensors" in p.name) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the dense model folder (SmolLM2-135M)")
    p.add_argument("--wikitext", type=Path, required=True, help="folder with wikitext-2.{valid,test}.txt")
    p.add_argument("--work", type=Path, required=True, help="where the compressed folders go")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--limit", type=int, default=24, help="test windows of 512 tokens")
    p.add_argument("--with-default", action="store_true", help="also the default (kfac + global): streamed, in memory")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    valid, test = args.wikitext / "wikitext-2.valid.txt", args.wikitext / "wikitext-2.test.txt"
    common = ["--budget", args.budget]
    whiten = ["--method", "whiten", "--allocation", "uniform"]
    rows = {
        "plain SVD, streamed": ["--stream", "--calibration", "none"],
        "whitened, streamed block by block": [*whiten, "--stream", "--calibration", str(valid)],
        "whitened, in memory": [*whiten, "--calibration", str(valid)],
    }
    if args.with_default:
        rows["default (kfac + global), streamed block by block"] = ["--stream", "--calibration", str(valid)]
        rows["in-memory default (kfac + global)"] = ["--calibration", str(valid)]
    results = {}
    for i, (name, flags) in enumerate(rows.items()):
        results[name] = compress(args.dense, args.work / f"row{i}", [*common, *flags])
        print(f"{name}: {results[name]['seconds']} s, peak RSS {results[name]['peak_rss_mb']} MB", flush=True)
    identical = same_weights(args.work / "row1", args.work / "row2")
    print(f"streamed and in-memory whitening weight files identical: {identical}", flush=True)
    identical_default = same_weights(args.work / "row3", args.work / "row4") if args.with_default else None
    if args.with_default:
        print(f"streamed and in-memory default weight files identical: {identical_default}", flush=True)

    tokenizer, dense_ppl = dense_perplexity(args.dense, test, args.limit)
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)
    for i, name in enumerate(rows):
        results[name]["perplexity"] = folder_perplexity(args.work / f"row{i}", tokenizer, test, args.limit)
        print(f"{name}: perplexity {results[name]['perplexity']:.2f}", flush=True)
    data = {
        "command": "python -m benchmarks.streamed_calibration " + " ".join(argv or sys.argv[1:]),
        "budget": float(args.budget),
        "dense_perplexity": dense_ppl,
        "identical_streamed_in_memory": identical,
        "identical_streamed_in_memory_default": identical_default,
        "rows": results,
    }
    if args.json:
        write_results(args.json.stem, data, args.json.parent)
    _print_table(data)


def _print_table(data: dict) -> None:
    dense = f"{data['dense_perplexity']:.2f}"
    print(f"\n| compress (budget {data['budget']}) | wall s | peak RSS MB | perplexity (× dense {dense}) |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in data["rows"].items():
        ratio = row["perplexity"] / data["dense_perplexity"]
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_rss_mb']:,} | {row['perplexity']:.4g} ({ratio:.3g}×) |")


if __name__ == "__main__":
    main()
