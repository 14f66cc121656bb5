"""A dense safetensors checkpoint read tensor by tensor, with plain file I/O (no memory map).

What streamed compression reads: single-file or sharded (``model.safetensors.index.json``)
checkpoints, each tensor read into fresh memory when it is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import StreamingRefusal, SvdloraError
from . import writer
from .writer import INDEX_NAME, WEIGHTS_NAME, TensorSpec

# a dense checkpoint's corrupted or incomplete index (``writer.weight_files``): a local folder's or a hub snapshot's
CHECKPOINT_REMEDY = "copy or download the checkpoint again"


class Checkpoint:
    """A local safetensors checkpoint (single file or sharded index): key -> file, shape, dtype."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.file_of: dict[str, Path] = {}
        self.spec: dict[str, TensorSpec] = {}
        self.offset: dict[str, int] = {}  # byte offset of each tensor's data in its file
        for file in self.files:
            for key, (spec, offset) in _read_header(file).items():
                self.file_of[key], self.spec[key], self.offset[key] = file, spec, offset
        self.renamed: dict[str, str] = {}  # model key -> checkpoint key, where transformers renames at load
        # model key -> why streaming cannot fill it (tensors merged or split, two tensors renamed onto it):
        # refused by ``resolve`` when the run needs the key, so an unused tensor does not refuse the checkpoint
        self.refused: dict[str, SvdloraError] = {}

    def follow_renames(self, model: torch.nn.Module) -> None:
        """Find the tensors of a checkpoint saved in a layout transformers renames at load (its conversion
        mapping: ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``
        in transformers 5) under the model's names; note the names it fills by merging or splitting
        tensors, or from two checkpoint tensors, which ``resolve`` refuses."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, rename_source_key
        except ImportError:  # transformers 4: checkpoints load under their own names
            return
        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        from transformers import core_model_loading

        # in the order transformers renames them (a GroupWeightRename acts once its first pattern was seen),
        # by name where this transformers lacks that order
        for key in sorted(self.spec, key=getattr(core_model_loading, "dot_natural_key", None)):
            name, converted = rename_source_key(key, renamings, converters)
            if converted is not None:
                self.refused.setdefault(
                    name,
                    StreamingRefusal(
                        "{folder!r} stores {key!r} in a layout transformers converts when loading {cls} (tensors "
                        "merged or split), which streaming does not: {in_memory}",
                        folder=str(self.folder), key=key, cls=type(model).__name__,
                    ),
                )  # fmt: skip
            elif name != key and name in self.renamed:  # the later one would silently win
                self.refused.setdefault(
                    name,
                    SvdloraError(
                        f"{str(self.folder)!r} stores both {self.renamed[name]!r} and {key!r}, which transformers "
                        f"renames to the one {type(model).__name__} weight {name!r} when loading: remove the "
                        "tensor that does not belong from the checkpoint"
                    ),
                )
            elif name != key:
                self.renamed[name] = key

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read with plain file I/O into fresh memory.

        Not ``safe_open``: it memory-maps the whole file, which under an address-space limit
        (``ulimit -v``) failed here on a 1 GB shard, and whose touched pages count in RSS.
        """
        spec = self.spec[key]
        out = torch.empty(spec.shape, dtype=spec.dtype)
        with open(self.file_of[key], "rb") as f:
            f.seek(self.offset[key])
            if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != spec.nbytes:
                raise SvdloraError(f"{str(self.file_of[key])!r} is truncated at {key!r}: re-download the checkpoint")
        return out

    def resolve(self, key: str, prefix: str) -> str | None:
        """The checkpoint's name for a model state key (base models are often saved without their prefix);
        refused where transformers fills the key by converting tensors or from two (``follow_renames``).

        A tensor transformers renames onto the key comes first, as it loads it: a mapping that shifts
        names (kimi_k25's norm0 -> norm1, norm1 -> norm2) fills norm1 from the checkpoint's norm0."""
        for candidate in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
            if candidate in self.refused:
                raise self.refused[candidate]
            if candidate in self.renamed:
                return self.renamed[candidate]
            if candidate in self.spec:
                return candidate
        return None


class SafetensorsDtype(NamedTuple):
    bits: int  # per value: the layout is checked without torch knowing the dtype
    torch_name: str | None  # None: this torch cannot hold it


DTYPES = {name: SafetensorsDtype(bits, torch_name) for name, (bits, torch_name) in {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "U16": (16, "uint16"), "I16": (16, "int16"),
    "U32": (32, "uint32"), "I32": (32, "int32"), "U64": (64, "uint64"), "I64": (64, "int64"),
    "F8_E5M2": (8, "float8_e5m2"), "F8_E4M3": (8, "float8_e4m3fn"), "F8_E8M0": (8, "float8_e8m0fnu"),
    "F4": (4, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None), "F16": (16, "float16"),
    "BF16": (16, "bfloat16"), "F32": (32, "float32"), "F64": (64, "float64"), "C64": (64, "complex64"),
}.items()}  # fmt: skip


def is_floating(name: str) -> bool:
    """Whether safetensors dtype ``name`` is a floating one (what ``from_pretrained(dtype=...)`` casts)."""
    return name.startswith("F") or name == "BF16"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (``writer.weight_files``), refused where it has none."""
    if not (folder / INDEX_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        raise StreamingRefusal(
            "{folder!r} has no model.safetensors or {index}: streaming reads safetensors checkpoints only; "
            "{in_memory}",
            folder=str(folder), index=INDEX_NAME,
        )  # fmt: skip
    return writer.weight_files(folder, remedy=CHECKPOINT_REMEDY)


def read_header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int]], dict[str, str]]:
    """({name: (safetensors dtype, shape, absolute data offset)}, metadata) of a safetensors file,
    read without mapping it.

    Raises ValueError where the file is not a complete safetensors file: the checks ``safe_open``
    makes (a header inside the file, every tensor's bytes where its offsets say, no gap, the data
    ending with the file), without its memory map of the whole file (see ``Checkpoint.read``).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > size - 8:
            raise ValueError(f"its header runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    try:  # in offset order, as safetensors checks them (zero-size tensors may share an offset)
        for key, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            begin, stop = entry["data_offsets"]
            shape, bits = tuple(int(d) for d in entry["shape"]), getattr(DTYPES.get(entry["dtype"]), "bits", None)
            if bits is None:
                raise ValueError(f"tensor {key!r} has dtype {entry['dtype']!r}, unknown to safetensors")
            if begin != end or (stop - begin) * 8 != math.prod(shape) * bits:
                raise ValueError(f"tensor {key!r} does not fill its data offsets {begin}..{stop}")
            tensors[key], end = (entry["dtype"], shape, 8 + length + begin), stop
    except (KeyError, TypeError) as err:
        raise ValueError(f"its header has a malformed entry ({type(err).__name__}: {err})") from None
    if 8 + length + end != size:
        raise ValueError(f"its tensors end at byte {8 + length + end} and the file at byte {size}: truncated")
    return tensors, metadata


def _read_header(file: Path) -> dict[str, tuple[TensorSpec, int]]:
    try:
        entries = read_header(file)[0]
    except (OSError, ValueError) as err:
        raise SvdloraError(f"{str(file)!r} is not a readable safetensors file ({err})") from None
    return {
        key: (TensorSpec(key, shape, _torch_dtype(dtype, file, key)), offset)
        for key, (dtype, shape, offset) in entries.items()
    }


def _torch_dtype(name: str, file: Path, key: str) -> torch.dtype:
    dtype = getattr(torch, DTYPES[name].torch_name or "", None)
    if not isinstance(dtype, torch.dtype):
        raise StreamingRefusal(
            "{file!r}: tensor {key!r} is stored as {name}, which this torch cannot hold: {in_memory}, or convert "
            "the checkpoint",
            file=str(file), key=key, name=name,
        )  # fmt: skip
    return dtype
