"""``python -m benchmarks all [--quick]``, ``python -m benchmarks <name> [args]``, ``python -m benchmarks report``.

Examples:
    python -m benchmarks all                    # every section (trains what is not cached), then BENCHMARKS.md
    python -m benchmarks all --quick            # smoke run: tiny models and slices
    python -m benchmarks all --data DIR         # DIR laid out as ../shared/data (mnist/, cifar10/, ...)
    python -m benchmarks vit_cifar --limit 10000
    python -m benchmarks report
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path

from benchmarks.report import SECTIONS

logger = logging.getLogger("benchmarks")

USAGE = f"usage: python -m benchmarks {{all [--quick],{','.join(SECTIONS)},report}} [args...]"
# Flags `all` passes on, and to which scripts (the MNIST ones take no cache folder).
SWEEPS = ("vit_cifar", "translation", "language_models")


def data_flags(name: str, root: Path) -> list[str]:
    """The flags pointing section ``name`` at the files of a data folder laid out as ../shared/data."""
    m30k, text = root / "multi30k", root / "text"
    paths = {
        "mnist_blog": {"--data": root / "mnist"},
        "nnsvd": {"--data": root / "mnist"},
        "vit_cifar": {"--data": root / "cifar10" / "cifar10-jpg.tar.gz"},
        "translation": {"--train-src": m30k / "train.de.gz", "--train-tgt": m30k / "train.en.gz",
                        "--test-src": m30k / "test_2016_flickr.de.gz", "--test-tgt": m30k / "test_2016_flickr.en.gz"},
        "language_models": {"--wikitext-test": text / "wikitext-2.test.txt",
                            "--wikitext-train": text / "wikitext-2.valid.txt",
                            "--shakespeare": text / "tinyshakespeare.txt", "--gpt2-tokenizer": root / "gpt2-tokenizer"},
    }[name]  # fmt: skip
    return [arg for flag, path in paths.items() for arg in (flag, str(path))]


def run(name: str, argv: list[str]):
    return importlib.import_module(f"benchmarks.{name}").main(argv)


def run_all(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks all", description="every benchmark, then the report")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models and slices")
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--cache-dir", default=None, help="default: .cache/benchmarks (sections 3-5)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder laid out as ../shared/data (mnist/, cifar10/, multi30k/, text/, "
                        "gpt2-tokenizer/); default: each script's own, ../shared/data")  # fmt: skip
    args = parser.parse_args(argv)
    common = (["--quick"] if args.quick else []) + (["--results-dir", args.results_dir] if args.results_dir else [])
    times = {}
    for name in SECTIONS:
        extra = ["--cache-dir", args.cache_dir] if args.cache_dir and name in SWEEPS else []
        extra += data_flags(name, args.data) if args.data else []
        start = time.perf_counter()
        run(name, common + extra)
        times[name] = time.perf_counter() - start
    run("report", common)
    for name, seconds in times.items():
        print(f"{name:<16} {seconds / 60:6.1f} min")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return
    name, rest = argv[0], argv[1:]
    if name == "all":
        run_all(rest)
    elif name in (*SECTIONS, "report"):
        run(name, rest)
    else:
        raise SystemExit(f"unknown benchmark {name!r}\n{USAGE}")


if __name__ == "__main__":
    main()
