"""`svdlora compress MODEL --budget B --submatrices N --output DIR`."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import transformers

from ..compress import compress
from ..config import CompressionConfig
from ..io import check_output, save_compressed
from ..models import load_pretrained
from . import options

EXAMPLES = """examples:
  svdlora compress gpt2 --budget 0.5 --submatrices 3 --output out/gpt2-svd
  svdlora compress gpt2 --budget 0.25 --submatrices 2 --stage-dtypes full-int4,int8 --output out/gpt2-q
  svdlora compress ./my-vit --budget 0.3 --exclude 're:.*attention.*' --output out/vit-svd
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="factorize a model's Linear/Conv1D layers and save the folder",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (e.g. gpt2) or local folder of a transformers model")
    p.add_argument("-o", "--output", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--budget",
        type=options.budget,
        default=0.5,
        help="factors hold at most this fraction of the targeted parameters, in (0, 1] (default 0.5)",
    )
    p.add_argument(
        "--submatrices",
        type=options.positive_int("submatrices"),
        default=1,
        help="residual SVD stages per matrix (default 1)",
    )
    p.add_argument(
        "--rank",
        type=options.positive_int("rank"),
        default=None,
        help="fixed total rank per matrix instead of a budget",
    )
    p.add_argument(
        "--stage-dtypes",
        default=None,
        metavar="DTYPES",
        help="how each stage is stored, comma-separated, the last repeated up to --submatrices: float32, "
        "float16, bfloat16, int8, int4 (group 128), int4g64, int4g32, or full-int8 / full-int4 as a full-rank "
        "quantized first stage; the budget then counts bytes (default: every stage in the model's dtype)",
    )
    p.add_argument("--include", nargs="+", metavar="PATTERN", help="only these modules (glob, or re:REGEX)")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", default=[], help="leave these modules dense")
    p.add_argument(
        "--compress-head",
        dest="keep_head",
        action="store_false",
        help="also factorize the output head / layers tied to embeddings",
    )
    p.add_argument("--svd-method", choices=("exact", "randomized"), default="exact")
    p.add_argument("--dtype", default=None, help="load the model in this dtype (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Check everything cheap before the (possibly slow) model load.
    config = CompressionConfig(
        budget=args.budget,
        submatrices=args.submatrices,
        rank=args.rank,
        include=args.include,
        exclude=args.exclude,
        keep_head=args.keep_head,
        svd_method=args.svd_method,
        stage_dtypes=args.stage_dtypes,
    )
    output = check_output(args.output, args.overwrite)  # fail before the (possibly slow) model load
    if not args.progress:
        transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = load_pretrained(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    load_seconds = time.perf_counter() - start
    report = compress(model, config, progress=args.progress)
    save_compressed(model, output, report=report, source=args.model, overwrite=args.overwrite)
    print(report.format())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        f"\nwrote {output}  (load {load_seconds:.1f} s, total {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_mb:,.0f} MB)",
        file=sys.stderr,
    )
    return 0
