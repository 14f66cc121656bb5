"""Stage storage precision: tensor <-> (integer tensor, scales[, zero points]) and what it costs.

Formats, by name (``--stage-dtypes``):

- ``float32``, ``float16``, ``bfloat16``: a plain cast.
- ``int8``: symmetric round-to-nearest, one scale per row (per output channel for a weight,
  per singular component for a factor): q = round(x / s), s = max|row| / 127.
- ``int4`` (= ``int4g128``), ``int4g64``, ``int4g32``: asymmetric round-to-nearest over groups of
  that many consecutive values of a row, 16 levels, one scale and one zero point per group,
  two values packed per uint8 (low nibble first).
- ``full-<int format>``: the first stage is the whole matrix in that format (full rank, the
  LQER/QERA shape); the low-rank stages after it repair its quantization error.

Scales are bfloat16 (2 bytes: float32's range, so tiny residual factors keep their scale) and
zero points uint8; both count in ``nbytes``. Everything works on the last dimension of a 2-D
tensor, so callers choose the axis by transposing (factors A are stored as Aᵀ: one scale per
singular component, which matches the √σ scaling of each column).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import SvdloraError

# float64: a model loaded so (``--dtype float64``) stores its factors so; not a format worth choosing
FLOAT_FORMATS = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SCALE_DTYPE = torch.bfloat16
DEFAULT_INT4_GROUP = 128
FULL_PREFIX = "full-"
_INT4 = re.compile(r"int4(?:g(\d+))?")


@dataclass(frozen=True)
class StageFormat:
    """How one stage is stored: ``kind`` is 'float', 'int8' or 'int4'."""

    name: str
    kind: str
    dtype: torch.dtype | None = None  # float formats
    group_size: int | None = None  # int4
    full: bool = False  # the first stage is the whole matrix, not a low-rank pair

    @property
    def quantized(self) -> bool:
        return self.kind != "float"


def parse_format(name: str) -> StageFormat:
    """A ``StageFormat`` from its name; one-line SvdloraError for anything else."""
    text = str(name).strip().lower()
    full = text.startswith(FULL_PREFIX)
    base = text.removeprefix(FULL_PREFIX)
    if base in FLOAT_FORMATS and not full:
        return StageFormat(text, "float", dtype=FLOAT_FORMATS[base])
    if base == "int8":
        return StageFormat(text, "int8", full=full)
    match = _INT4.fullmatch(base)
    if match:
        group = int(match.group(1) or DEFAULT_INT4_GROUP)
        if group < 2 or group % 2:
            raise SvdloraError(f"int4 group size must be an even number >= 2, got {group} in {name!r}")
        return StageFormat(text, "int4", group_size=group, full=full)
    raise SvdloraError(
        f"unknown stage dtype {name!r}: use {', '.join(FLOAT_FORMATS)}, int8, int4 (group {DEFAULT_INT4_GROUP}), "
        "int4g64, int4g32, or full-int8 / full-int4 for a full-rank quantized first stage"
    )


def parse_stage_dtypes(text: str | list[str] | None) -> list[str] | None:
    """'float32,int8' or a list -> validated, normalized names (None: every stage in the model dtype)."""
    if text is None:
        return None
    names = text.split(",") if isinstance(text, str) else text
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise SvdloraError(
            f"stage_dtypes must be a comma-separated list such as float32,int8 (or a list of such names), got {text!r}"
        )
    names = [n.strip() for n in names]
    formats = [parse_format(n) for n in names]
    if any(f.full for f in formats[1:]):
        raise SvdloraError(f"only the first stage can be full-rank (full-…), got {','.join(names)}")
    return [f.name for f in formats]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how reports, configs and stage formats name a dtype."""
    return str(dtype).removeprefix("torch.")


def float_format(dtype: torch.dtype) -> StageFormat:
    """The plain-cast format of a model dtype (what a stage costs without ``--stage-dtypes``)."""
    name = dtype_name(dtype)
    if name not in FLOAT_FORMATS:
        raise SvdloraError(f"model dtype {name} cannot hold factors: load the model in {' or '.join(FLOAT_FORMATS)}")
    return StageFormat(name, "float", dtype=dtype)


def nbytes(fmt: StageFormat, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) tensor stored in ``fmt``, scales and zero points included."""
    if fmt.kind == "float":
        return rows * cols * torch.finfo(fmt.dtype).bits // 8
    return sum(r * c * _PART_BYTES[part] for part, (r, c) in stored_shapes(fmt, rows, cols).items())


_PART_BYTES = {"q": 1, "scales": 2, "zeros": 1}  # int8 / packed uint8 values, bf16 scales, uint8 zero points


def stored_shapes(fmt: StageFormat, rows: int, cols: int) -> dict[str, tuple[int, int]]:
    """The shapes ``quantize`` gives the parts of a (rows, cols) tensor in a quantized ``fmt``."""
    if fmt.kind == "int8":
        return {"q": (rows, cols), "scales": (rows, 1)}
    groups = math.ceil(cols / _group(fmt, cols))
    return {"q": (rows, math.ceil(cols / 2)), "scales": (rows, groups), "zeros": (rows, groups)}


def stage_bytes(fmt: StageFormat, out_features: int, in_features: int, rank: int) -> int:
    """Bytes of one low-rank stage A (out, rank), B (rank, in); A is stored as Aᵀ (rank, out)."""
    return nbytes(fmt, rank, out_features) + nbytes(fmt, rank, in_features)


def quantize(x: torch.Tensor, fmt: StageFormat) -> dict[str, torch.Tensor]:
    """The stored tensors of a 2-D ``x`` in ``fmt``: {"": x cast} for floats, else {"q", "scales"[, "zeros"]}."""
    if fmt.kind == "float":
        return {"": x.detach().to(fmt.dtype)}
    work = x.detach().float()
    if fmt.kind == "int8":
        scales = (work.abs().amax(dim=1, keepdim=True) / 127).to(SCALE_DTYPE)
        s = _nonzero(scales.float())
        q = (work / s).round().clamp(-127, 127).to(torch.int8)
        return {"q": q, "scales": scales}
    rows, cols = work.shape
    g = _group(fmt, cols)
    groups = math.ceil(cols / g)
    padded = torch.nn.functional.pad(work, (0, groups * g - cols)).view(rows, groups, g)
    if cols % g:  # padding zeros must not widen the last group's range
        last = work[:, (groups - 1) * g :]
        padded[:, -1, cols - (groups - 1) * g :] = last[:, :1]
    low, high = padded.amin(dim=2), padded.amax(dim=2)
    low, high = low.clamp(max=0), high.clamp(min=0)  # zero stays exact (zero rows, sparse factors)
    scales = ((high - low) / 15).to(SCALE_DTYPE)
    s = _nonzero(scales.float())
    zeros = (-low / s).round().clamp(0, 15)
    q = (padded / s[..., None] + zeros[..., None]).round().clamp(0, 15).to(torch.uint8)
    q = q.view(rows, groups * g)[:, :cols]
    if cols % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return {"q": packed.contiguous(), "scales": scales, "zeros": zeros.to(torch.uint8)}


def dequantize(
    parts: dict[str, torch.Tensor], fmt: StageFormat, cols: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (rows, cols) tensor ``parts`` stands for, in ``dtype``, on the parts' device."""
    if fmt.kind == "float":
        return parts[""].to(dtype)
    scales = parts["scales"].float()
    if fmt.kind == "int8":
        return (parts["q"].float() * scales).to(dtype)
    packed = parts["q"]
    rows = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=2).view(rows, -1)[:, :cols].float()
    g = _group(fmt, cols)
    groups = scales.shape[1]
    q = torch.nn.functional.pad(q, (0, groups * g - cols)).view(rows, groups, g)
    values = (q - parts["zeros"].float()[..., None]) * scales[..., None]
    return values.view(rows, groups * g)[:, :cols].to(dtype)


def roundtrip(x: torch.Tensor, fmt: StageFormat) -> torch.Tensor:
    """``x`` as it reads back after storage in ``fmt`` (float32 for quantized formats)."""
    dtype = fmt.dtype if fmt.kind == "float" else torch.float32
    return dequantize(quantize(x, fmt), fmt, x.shape[1], dtype)


def _group(fmt: StageFormat, cols: int) -> int:
    # A group longer than the row is the row: the same scales and values, without padding every row
    # to the group's length (int4g1048576 on a 576-wide factor took 1 GB; a larger one, all memory).
    return min(fmt.group_size, max(cols, 1))


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    # An all-zero row or group has scale 0: divide by 1 instead (q = 0, and 0·s = 0 on the way back).
    return torch.where(scales == 0, torch.ones_like(scales), scales)
