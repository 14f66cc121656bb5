"""`svdlora info FOLDER`: what a compressed folder holds, without loading the weights."""

from __future__ import annotations

import argparse

from ..io import read_config
from ..report import CompressionReport


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show ranks, sizes and errors of a compressed folder")
    p.add_argument("folder", help="a folder written by `svdlora compress`")
    p.add_argument("--summary", action="store_true", help="only the summary, not one line per layer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = read_config(args.folder)
    report = CompressionReport.from_dict(data["report"])
    base = data.get("base_model", {})
    print(f"svdlora {data.get('svdlora_version')} folder: {args.folder}")
    print(f"base model: {base.get('name_or_path')} ({base.get('class')}), dtype {data.get('dtype')}")
    if data.get("world_size", 1) > 1:
        print(f"written by {data['world_size']} processes (torch.distributed)")
    print(report.format(modules=not args.summary))
    return 0
