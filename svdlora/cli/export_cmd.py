"""`svdlora export FOLDER --dense --output DIR`: a plain transformers checkpoint with A·B merged."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import card
from ..bars import quiet_bars
from ..errors import SvdloraError
from ..io.outputs import atomic_folder, ensure_space, readable_as_umask
from . import options


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a compressed folder as a normal dense checkpoint")
    p.add_argument("folder", help="a folder written by `svdlora compress`")
    p.add_argument(
        "--dense",
        action="store_true",
        required=True,
        help="merge the factors into dense weights (the only export format)",
    )
    p.add_argument("-o", "--output", required=True, help="folder to write")
    options.add_max_shard_size_flag(p)
    options.add_overwrite_flag(p)
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.folder import read_config  # torch: imported once the flags are known good
    from ..io.load import load_compressed
    from ..io.saving import check_output, copy_preprocessor_files
    from ..io.writer import parse_size

    folder = Path(args.folder).expanduser()  # '~/svd' quoted, as every other command's paths
    check_output(args.output, args.overwrite, inputs=[folder])  # before the slow load
    # bytes, as svdlora reads sizes everywhere: save_pretrained's own reading (huggingface_hub) refuses '2GiB', '5B'
    max_shard_size = parse_size(args.max_shard_size)
    data = read_config(folder)
    _check_transformers_folder(folder, data)
    model = load_compressed(folder, device="cpu", merge=True)
    # --no-progress: save_pretrained's shard bars too
    with quiet_bars(args.progress), atomic_folder(args.output, overwrite=args.overwrite, inputs=[folder]) as tmp:
        ensure_space(tmp, sum(t.numel() * t.element_size() for t in model.state_dict().values()), args.output)
        # what loading will not tie again written under each name (save_guard)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        readable_as_umask(*tmp.glob("*.safetensors"))  # one file or its shards
        copy_preprocessor_files(folder, tmp)
        card.write(tmp, card.dense_export_card(args.folder, data))
    print(f"wrote dense checkpoint {args.output}")
    return 0


def _check_transformers_folder(folder: Path, data: dict) -> None:
    """A plain PyTorch model's folder has no config.json to rebuild it from (load_compressed then needs
    its instance, ``model=``, which the command line cannot pass), nor a save_pretrained to write it. A
    transformers model's record names its ``model_type``: its folder lost the config.json it was written with."""
    from ..io.load import plain_model_class

    base = data.get("base_model") or {}
    if cls := plain_model_class(folder, base):
        raise SvdloraError(
            f"{str(folder)!r} holds a plain PyTorch model ({cls}, no config.json): only transformers models can be "
            f"exported as dense checkpoints; in Python, load_compressed(folder, model=<a {cls}>, merge=True) gives "
            "it with dense weights (save its state_dict)"
        )
    if not (folder / "config.json").is_file():  # a transformers model's (its model_type is recorded)
        source = f" ({base['name_or_path']})" if base.get("name_or_path") else ""
        raise SvdloraError(
            f"{str(folder)!r} holds a {base.get('class') or 'its class'} (model_type {base['model_type']!r}) but its "
            f"config.json is missing: copy the base model's config.json{source} into it, or re-run `svdlora compress`"
        )
