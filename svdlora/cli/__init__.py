"""`svdlora` command line: a thin shell over the Python API, one module per command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import card
from ..errors import SvdloraError
from ..version import __version__
from . import compress_cmd, convert_cmd, eval_cmd, export_cmd, extract_cmd, info_cmd, sweep_cmd

COMMANDS = (compress_cmd, info_cmd, export_cmd, eval_cmd, convert_cmd, extract_cmd, sweep_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdlora",
        description="Compress Hugging Face / PyTorch checkpoints with residual truncated SVD.",
        epilog="Set SVDLORA_TRACEBACK=1 to see full tracebacks of errors.",
    )
    parser.add_argument("--version", action="version", version=f"svdlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    card.set_cli_argv(sys.argv[1:] if argv is None else argv)  # the exact command, for model cards
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args) or 0
    except SvdloraError as err:
        if os.environ.get("SVDLORA_TRACEBACK"):
            raise
        print(f"svdlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
