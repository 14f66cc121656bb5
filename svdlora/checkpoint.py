"""A dense safetensors checkpoint read tensor by tensor, with plain file I/O (no memory map).

What streamed compression reads: single-file or sharded (``model.safetensors.index.json``)
checkpoints, each tensor read into fresh memory when it is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import SvdloraError
from .writer import INDEX_NAME, WEIGHTS_NAME, TensorSpec


class Checkpoint:
    """A local safetensors checkpoint (single file or sharded index): key -> file, shape, dtype."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise SvdloraError(
                f"{str(self.folder)!r} has no model.safetensors or {INDEX_NAME}: streaming reads safetensors "
                "checkpoints only; compress without --stream"
            )
        self.files = [self.folder / f for f in files]
        self.file_of: dict[str, Path] = {}
        self.spec: dict[str, TensorSpec] = {}
        self.offset: dict[str, int] = {}  # byte offset of each tensor's data in its file
        for file in self.files:
            for key, (spec, offset) in _read_header(file).items():
                self.file_of[key], self.spec[key], self.offset[key] = file, spec, offset

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
        """The checkpoint's name for a model state key (base models are often saved without their prefix)."""
        for candidate in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
            if candidate in self.spec:
                return candidate
        return None


def _read_header(file: Path) -> dict[str, tuple[TensorSpec, int]]:
    """{name: (spec, absolute data offset)} from a safetensors header, without mapping the file."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        raise SvdloraError(f"{str(file)!r} is not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return {
        key: (TensorSpec(key, tuple(v["shape"]), _torch_dtype(v["dtype"])), 8 + length + v["data_offsets"][0])
        for key, v in header.items()
    }


def _torch_dtype(name: str) -> torch.dtype:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
    names |= {"I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    names |= {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return getattr(torch, names.get(name, name.lower()))
