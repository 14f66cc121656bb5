"""Calibrated compression in 1 process vs 2 under torchrun (issue 10, item 2).

    OMP_NUM_THREADS=1 python -m benchmarks.distributed_calibration --dense ~/.cache/svdlora/SmolLM2-135M \
        --wikitext /work/shared/data/text --work /tmp/distributed-calibration \
        [--budget 0.5] [--samples 8] [--methods default,whiten] [--json benchmarks/results/distributed_calibration.json]

For each method (the default kfac + global allocation; whitening with uniform allocation), one
fresh `svdlora compress --stream --calibration VALID --calibration-samples N` process, then the same
command under `torchrun --standalone --nproc_per_node 2` (each rank runs its share of the windows
block by block; the statistic sums are added over the ranks). Reported: wall time of each command
and its ratio, the largest peak RSS the CLI prints (per rank under torchrun), whether the weight
files are identical, the largest difference between the two merged models' weights relative to
each matrix's largest entry, whether every matrix got the same ranks, and perplexity on issue 8's
protocol (WikiText-2 *test*, the first 24 windows of 512 tokens, float32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import svdlora

from .common import write_results
from .streamed_calibration import compress, dense_perplexity, folder_perplexity, same_weights

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "svdlora"]
METHODS = {"default": [], "whiten": ["--method", "whiten", "--allocation", "uniform"]}


def compare(one: Path, two: Path) -> dict:
    """How far the two folders' merged weights are apart, and whether their ranks agree."""
    ranks = [
        [m.get("ranks") for m in json.loads((f / "svdlora_config.json").read_text())["report"]["modules"]]
        for f in (one, two)
    ]
    a, b = (svdlora.load_compressed(f, device="cpu", runtime="merged").state_dict() for f in (one, two))
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a)
    return {"identical_files": same_weights(one, two), "same_ranks": ranks[0] == ranks[1], "max_rel_diff": worst}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the dense model folder (SmolLM2-135M)")
    p.add_argument("--wikitext", type=Path, required=True, help="folder with wikitext-2.{valid,test}.txt")
    p.add_argument("--work", type=Path, required=True, help="where the compressed folders go")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--samples", type=int, default=8, help="calibration windows of 512 tokens")
    p.add_argument("--methods", default="default,whiten", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--limit", type=int, default=24, help="test windows of 512 tokens")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    valid, test = args.wikitext / "wikitext-2.valid.txt", args.wikitext / "wikitext-2.test.txt"
    common = ["--budget", args.budget, "--stream", "--calibration", str(valid)]
    common += ["--calibration-samples", str(args.samples)]
    rows = {}
    for method in args.methods.split(","):  # every command before this process loads a model: a child
        flags = [*common, *METHODS[method]]  # starts with its parent's RSS as its peak (kept across exec)
        row = {"1 process": compress(args.dense, args.work / f"{method}-1", flags)}
        row["2 processes"] = compress(args.dense, args.work / f"{method}-2", flags, TORCHRUN)
        row["ratio_2_to_1"] = row["2 processes"]["seconds"] / row["1 process"]["seconds"]
        rows[method] = row
        print(f"{method}: {json.dumps(row)}", flush=True)
    for method, row in rows.items():
        row.update(compare(args.work / f"{method}-1", args.work / f"{method}-2"))

    tokenizer, dense_ppl = dense_perplexity(args.dense, test, args.limit)
    for method, row in rows.items():
        for n, name in (("1", "1 process"), ("2", "2 processes")):
            row[name]["perplexity"] = folder_perplexity(args.work / f"{method}-{n}", tokenizer, test, args.limit)
    data = {
        "command": "python -m benchmarks.distributed_calibration " + " ".join(argv or sys.argv[1:]),
        "budget": float(args.budget),
        "samples": args.samples,
        "dense_perplexity": dense_ppl,
        "rows": rows,
    }
    if args.json:
        write_results(args.json.stem, data, args.json.parent)
    _print_table(data)


def _print_table(data: dict) -> None:
    print(f"\n| method (budget {data['budget']}, {data['samples']} windows) | processes | wall s | ratio | peak RSS MB "
          f"(per process) | perplexity (dense {data['dense_perplexity']:.2f}) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method, row in data["rows"].items():
        for name in ("1 process", "2 processes"):
            r = row[name]
            ratio = r["seconds"] / row["1 process"]["seconds"]
            print(f"| {method} | {name[0]} | {r['seconds']:.1f} | {ratio:.2f} | {r['peak_rss_mb']:,} | "
                  f"{r['perplexity']:.5f} |")  # fmt: skip
    for method, row in data["rows"].items():
        print(f"{method}: identical files {row['identical_files']}, same ranks {row['same_ranks']}, "
              f"largest merged-weight difference {row['max_rel_diff']:.2e} of the matrix's largest entry")  # fmt: skip


if __name__ == "__main__":
    main()
