"""The one safetensors writer behind in-memory, streamed and distributed compression.

The layout of every shard is fixed before any tensor is computed, from names, shapes and
dtypes alone (factor shapes follow from the allocated ranks). So tensors can be written in
any order, each straight to its byte offset, by any process: memory holds one tensor at a
time, and the files do not depend on who wrote what, or when (streamed, in-memory and
multi-process runs give the same bytes).

Each shard is a standard safetensors file: an 8-byte little-endian header length, a JSON
header (space-padded to 8 bytes) with ``__metadata__`` and ``{dtype, shape, data_offsets}``
per tensor, then the raw little-endian data. Within a shard tensors are ordered by element
size, largest first (as safetensors does), so every tensor starts aligned to its element size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SvdloraError
from .outputs import ensure_space

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "svdlora_config.json"  # the svdlora config; written last, it marks a finished folder
INDEX_NAME = "model.safetensors.index.json"

DTYPE_NAMES = {  # torch dtype -> safetensors header name
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


MAX_OPEN_FILES = 64  # shard files a writer keeps open at once (far below a usual ulimit -n of 1024)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def parse_size(size: int | str, name: str = "max shard size") -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as transformers, binary with 'i');
    ``name`` is the option the error names."""
    nbytes = size if isinstance(size, int) and not isinstance(size, bool) else None  # True is no size
    # 'i' only after a unit: "5iB" is no size (it was read as 5 bytes)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?))?B?\s*", str(size).upper())
    if nbytes is None and match:
        number, unit, binary = match.groups()
        nbytes = int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if nbytes is None or nbytes <= 0:
        raise SvdloraError(f"{name} must look like 5GB, 500MB or 2GiB (above 0 bytes), got {size!r}")
    return nbytes


def plan_shards(specs: list[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes each (transformers'
    rule: a new shard starts when the next tensor would overflow; a larger tensor gets its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return [WEIGHTS_NAME] if count == 1 else _numbered_shards("model", count)


def _numbered_shards(stem: str, count: int) -> list[str]:
    """``stem-00001-of-0000n.safetensors`` .. ``stem-0000n-of-0000n.safetensors`` (transformers' naming)."""
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Pre-laid-out safetensors shards in ``folder``; ``write(name, tensor)`` in any order.

    Example:
        >>> w = ShardedWriter(folder, specs, {"format": "pt"}, "5GB")
        >>> w.create_files()          # one process
        >>> for spec in specs: w.write(spec.name, tensors[spec.name])
        >>> w.close(); w.write_index()
    """

    def __init__(self, folder: str | Path, specs: list[TensorSpec], metadata: dict[str, str], max_shard_size) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_size)
        self.files = shard_file_names(len(self.shards))
        self.where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard, byte offset in file, spec)
        self.headers: list[bytes] = []
        self.sizes: list[int] = []
        for index, shard in enumerate(self.shards):
            ordered = sorted(shard, key=lambda s: -s.dtype.itemsize)  # stable: plan order within a size
            header, offset = {"__metadata__": dict(metadata)}, 0
            for spec in ordered:
                header[spec.name] = {
                    "dtype": DTYPE_NAMES[spec.dtype],
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            self.headers.append(len(raw).to_bytes(8, "little") + raw)
            self.sizes.append(start + offset)
            for spec in ordered:
                self.where[spec.name] = (index, start + header[spec.name]["data_offsets"][0], spec)
        self._handles: dict[int, object] = {}
        self.written: set[str] = set()

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for _, _, spec in self.where.values())

    def create_files(self) -> None:
        """Write every header and size every file (sparse until filled)."""
        for name, header, size in zip(self.files, self.headers, self.sizes, strict=True):
            with open(self.folder / name, "wb") as f:
                f.write(header)
                f.truncate(size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, spec = self.where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        handle = self._handles.pop(shard, None)  # re-inserted last: the dict is least recently used first
        if handle is None:
            if len(self._handles) >= MAX_OPEN_FILES:  # thousands of shards: not one descriptor each
                self._handles.pop(next(iter(self._handles))).close()
            handle = open(self.folder / self.files[shard], "r+b")
        self._handles[shard] = handle
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        handle.seek(offset)
        handle.write(memoryview(data.numpy()))
        self.written.add(name)

    def unwritten(self, written: set[str]) -> list[str]:
        """The planned tensors not in ``written`` (every rank's ``self.written``): a slot left zero."""
        return sorted(set(self.where) - written)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.flush()
            handle.close()
        self._handles.clear()

    def write_index(self) -> None:
        """``model.safetensors.index.json`` as transformers writes it (only when there are shards)."""
        if len(self.files) == 1:
            return
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {name: self.files[shard] for name, (shard, _, _) in sorted(self.where.items())},
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def bytes_on_disk(self) -> int:
        return sum(self.sizes)


def write_tensors(
    folder: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str], max_shard_size, shown: str
) -> ShardedWriter:
    """Write ``tensors`` (name, tensor; in file order) into shards of ``folder``, one tensor at a time, with the
    index where there are several; refused before any byte is written when the disk of ``shown`` lacks room."""
    specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in tensors]
    writer = ShardedWriter(folder, specs, metadata, max_shard_size)
    ensure_space(folder, writer.total_size, shown)
    writer.create_files()
    for key, tensor in tensors:  # one tensor copied at a time, not the whole model
        writer.write(key, tensor)
    writer.close()
    writer.write_index()
    return writer


def weight_files(folder: str | Path, remedy: str = "re-run `svdlora compress`") -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or the single file; a corrupted or
    incomplete index is refused with ``remedy`` (a compressed folder's, unless the caller reads another)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
            # shards are files of this folder: not another folder's (``..``, an absolute path), not numbers
            if not names or not all(isinstance(n, str) and n and _inside(n) for n in names):
                raise ValueError("weight_map must map tensor names to shard file names in the folder")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise SvdloraError(f"{index} is corrupted ({err}): {remedy}") from None
        unlisted = _unlisted_shards(names)
        if unlisted:  # transformers would load the model without that shard's tensors: randomly initialized
            raise SvdloraError(
                f"{index} names no tensor of {unlisted}, though its shard names count it: the index is incomplete "
                f"or was edited; {remedy}"
            )
        return [folder / name for name in sorted(names)]
    return [folder / WEIGHTS_NAME]


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def _unlisted_shards(names: set[str]) -> list[str]:
    """Shards of the ``stem-0000i-of-0000n`` naming (``shard_file_names``, transformers') that an index
    names no tensor of: a shard left out of it, whose tensors no loader would read."""
    parts = [_SHARD_NAME.match(name) for name in names]
    if not all(parts) or len({(p["stem"], p["count"]) for p in parts}) != 1:
        return []  # another naming: nothing says how many shards there are
    return [name for name in _numbered_shards(parts[0]["stem"], int(parts[0]["count"])) if name not in names]


def _inside(name: str) -> bool:
    return ".." not in Path(name).parts and not Path(name).is_absolute()


def folder_format(model: torch.nn.Module, report=None) -> int:
    """The format a folder of ``model`` is written in: the highest its contents need (2: stage dtypes,
    3: pivoted factors, 4: a ``report`` line whose error was not measured), else 1, which older svdlora
    reads too. Works on the meta skeleton of streamed compression alike (its errors are all measured)."""
    from ..layers import LowRankLinear
    from ..pivoted import PivotedLowRankLinear

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    needs = [1]
    if any(m.stage_dtypes for m in layers):
        needs.append(2)
    if any(isinstance(m, PivotedLowRankLinear) for m in layers):
        needs.append(3)
    if report is not None and any(m.rel_error is None for m in report.factorized):
        needs.append(4)  # null rel_error: svdlora before format 4 refused it as an edited file
    return max(needs)


def header_metadata(tied: dict[str, str], format_version: int = 1) -> dict[str, str]:
    """The header of every shard; format 1 unless some stage is stored in its own dtype (2)."""
    from ..version import __version__

    return {
        "format": "pt",
        "svdlora_version": __version__,
        "svdlora_format_version": str(format_version),
        "tied": json.dumps(tied, sort_keys=True),
    }


def file_layout(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The tensors of a compressed model in file order, and {dropped tied name: stored name}.

    Stages are split out of each ``LowRankLinear``; tied tensors are stored once. Works on a
    real model and on its meta-device skeleton alike (ties are then found by object identity),
    which is how streamed compression lays out the same file as the in-memory path.
    """
    from ..layers import LowRankLinear
    from ..pivoted import PivotedLowRankLinear

    tensors: list[tuple[str, torch.Tensor]] = []
    lowrank = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, module in lowrank:
        if isinstance(module, PivotedLowRankLinear):
            tensors += [(f"{name}.pivoted.{key}", getattr(module, key)) for key in ("B", "C", "rows")]
            continue
        if module.stage_dtypes:  # stages in their own dtypes, quantized ones as q/scales/zeros (issue 9)
            from ..chain import file_tensors

            tensors += list(file_tensors(name, module).items())
            continue
        for j, (a, b) in enumerate(module.stages()):
            tensors += [(f"{name}.stage{j}.A", a), (f"{name}.stage{j}.B", b)]
    lowrank_keys = {f"{n}.{s}" for n, _ in lowrank for s in ("A", "B", "C", "rows", "full")}
    tensors += [(k, v) for k, v in model.state_dict(keep_vars=True).items() if k not in lowrank_keys]
    stored, tied, seen = [], {}, {}
    for key, tensor in tensors:
        if tensor.device.type == "meta":
            identity = ("meta", id(tensor))
        else:
            identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        stored.append((key, tensor))
    return stored, tied
