"""`svdlora info FOLDER`: what a compressed folder holds, without loading the weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..report import CompressionReport


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show ranks, sizes and errors of a compressed folder")
    p.add_argument("folder", help="a folder written by `svdlora compress`")
    p.add_argument(
        "--summary", action="store_true", help="only the summary, not one line per layer (with --json: no 'modules')"
    )
    p.add_argument("--json", action="store_true", help="print the folder's full record (per-module report) as JSON")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also read every tensor and refuse NaN/Inf values and broken pivot indices (loading checks headers and "
        "shapes only, as transformers does; this finds a corrupted byte inside a factor): what was read is the "
        "report's last line "
        "(with --json on stderr, so that stdout stays the record)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.folder import check_folder, verify_values  # torch: imported once the flags are known good

    folder = Path(args.folder).expanduser()  # '~/svd' quoted, as every other command's paths
    data = check_folder(folder)  # the weights' header too: info never vouches for a broken folder
    verified = None
    if args.verify:  # before anything is printed: a corrupted folder is one error line (stderr)
        tensors, nbytes = verify_values(folder)
        verified = f"verified: {tensors} tensors ({nbytes / 1e6:,.1f} MB) read, every value finite"
    if args.json:
        if args.summary:  # the per-layer list is what --summary leaves out of the table too
            data = {**data, "report": {k: v for k, v in data["report"].items() if k != "modules"}}
        print(json.dumps(data, indent=2, sort_keys=True))
        if verified:  # stdout is the folder's record, one JSON document
            print(verified, file=sys.stderr)
        return 0
    report = CompressionReport.from_dict(data["report"])
    base = data.get("base_model", {})
    print(f"svdlora {data.get('svdlora_version')} folder: {args.folder}")
    print(f"base model: {base.get('name_or_path')} ({base.get('class')}), dtype {data.get('dtype')}")
    if data.get("world_size", 1) > 1:
        print(f"written by {data['world_size']} processes (torch.distributed)")
    print(report.format(modules=not args.summary))
    if verified:  # part of the report: `info DIR --verify > report.txt` keeps it
        print(verified)
    return 0
