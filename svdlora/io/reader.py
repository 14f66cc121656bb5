"""Reading a compressed folder's tensors onto a device, one tensor at a time.

Each factorized layer's stages are copied into one preallocated (A, B) pair on the target
device (no second copy of the factors while concatenating), or, when merging, multiplied out
there layer by layer, so the peak is the result plus one layer's factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import SvdloraError
from ..layers import as_stored_by, factor_layout
from ..pivoted import pivoted_weight, valid_rows
from ..report import CompressionReport


class FolderTensors:
    """Name -> tensor over all shards of a folder, read lazily onto ``device``."""

    def __init__(self, files: list[Path], device: torch.device) -> None:
        self.folder = files[0].parent
        self._stack = ExitStack()
        self.where: dict[str, object] = {}
        try:
            for file in files:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device=str(device)))
                for key in handle.keys():
                    self.where[key] = handle
        except (SafetensorError, OSError, RuntimeError) as err:
            self._stack.close()
            raise SvdloraError(f"{str(files[0].parent)!r} cannot be read ({err}): re-run `svdlora compress`") from None

    def get(self, key: str) -> torch.Tensor:
        try:
            handle = self.where.pop(key)
        except KeyError:
            raise SvdloraError(
                f"{str(self.folder)!r} lacks factor {key!r}: the file is corrupted, re-run `svdlora compress`"
            ) from None
        return handle.get_tensor(key)

    # the mapping protocol chain.read_file_tensors reads quantized stages with
    def __contains__(self, key: str) -> bool:
        return key in self.where

    def pop(self, key: str) -> torch.Tensor:
        return self.get(key)

    def rest(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in list(self.where):
            yield key, self.get(key)

    def close(self) -> None:
        self._stack.close()


def _stacked(tensors: FolderTensors, name: str, ranks: list[int], part: str, dtype, device) -> torch.Tensor:
    keys = [f"{name}.stage{j}.{part}" for j in range(len(ranks))]
    if len(keys) == 1:
        return tensors.get(keys[0]).to(device=device, dtype=dtype)
    first = tensors.get(keys[0])
    dim = 1 if part == "A" else 0
    shape = list(first.shape)
    shape[dim] = sum(ranks)
    out = torch.empty(shape, dtype=dtype or first.dtype, device=device)
    offset = 0
    for j, key in enumerate(keys):
        t = first if j == 0 else tensors.get(key)
        out.narrow(dim, offset, t.shape[dim]).copy_(t)
        offset += t.shape[dim]
        del t
    return out


def read_state(
    files: list[Path],
    report: CompressionReport,
    device: torch.device,
    dtype: torch.dtype | None,
    merge: bool,
    place: Callable[[str], torch.device] | None = None,
    stored_dtypes: dict[str, list[str]] | None = None,
    compute_dtype: torch.dtype | None = None,
    stored_parts: dict[str, list] | None = None,
    only: set[str] | None = None,
    keeps_fp32: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict for ``load_state_dict(assign=True)``: ``<layer>.A/.B`` per factorized layer,
    or, with ``merge``, the dense ``<layer>.weight`` (in the layer's own layout) built on ``device``.
    ``place(name)`` overrides the device per tensor (a device map): files are then read on the CPU
    and each tensor moved on its own, so no full copy of the model sits on the CPU.
    ``stored_dtypes[name]``: that layer's stages are stored in their own dtypes (issue 9); they are
    dequantized in ``compute_dtype`` (a full-rank first stage becomes ``<layer>.full``), and their
    stored parts go to ``stored_parts[name]`` so that re-saving writes the same bits. ``only``: read
    these factorized layers and nothing else. ``keeps_fp32(name)``: that tensor is cast (its stages
    dequantized) in float32, not ``dtype`` (``models.keep_in_fp32``: T5's ``wo`` under float16, as
    ``from_pretrained`` keeps it)."""
    stored_dtypes = stored_dtypes or {}
    tensors = FolderTensors(files, device if place is None else torch.device("cpu"))
    place = place or (lambda _: device)
    state: dict[str, torch.Tensor] = {}
    try:
        for m in report.factorized if only is None else [m for m in report.factorized if m.name in only]:
            cast, compute = _kept(keeps_fp32, f"{m.name}.weight", dtype, compute_dtype)  # this layer's
            where = place(f"{m.name}.weight")
            state.update(_read_layer(tensors, m, where, cast, compute, merge, stored_dtypes.get(m.name), stored_parts))
        for key, t in tensors.rest() if only is None else ():
            t, cast = t.to(place(key)), _kept(keeps_fp32, key, dtype, None)[0]
            state[key] = t.to(cast) if cast is not None and t.is_floating_point() else t
    finally:
        tensors.close()
    return state


def _read_layer(tensors, m, where, cast, compute, merge, stage_dtypes, stored_parts) -> dict[str, torch.Tensor]:
    """read_state's entries for factorized layer ``m``: its factors, or with ``merge`` its dense weight.
    Returning frees this layer's factors, so a merged load holds one layer's next to the result."""
    if m.pivoted:
        b, c, rows = _read_pivoted(tensors, m, None if merge else cast, where)
        if merge:
            return _dense(m, _cast(pivoted_weight(*_widened(cast, b, c), rows), cast))
        return {f"{m.name}.B": b, f"{m.name}.C": factor_layout(c), f"{m.name}.rows": rows}
    a, b, full = _read_factors(tensors, m, where, cast, compute, merge, stage_dtypes, stored_parts)
    if not merge:
        return {f"{m.name}.A": factor_layout(a), f"{m.name}.B": b} | ({} if full is None else {f"{m.name}.full": full})
    a, b = _widened(cast, a, b)
    dense = a @ b if full is None else full.to(a.dtype) + a @ b
    return _dense(m, _cast(dense, (cast or compute) if stage_dtypes is not None else cast))


def _read_factors(tensors, m, where, cast, compute, merge, stage_dtypes, stored_parts) -> tuple:
    """(A, B, full-rank first stage or None) of ``m`` on ``where``: stages stored in their own dtypes
    (``stage_dtypes``) are dequantized in ``compute``, widened to float32 at least when merging."""
    if stage_dtypes is None:
        cast = None if merge else cast
        a, b = (_stacked(tensors, m.name, m.ranks, part, cast, where) for part in "AB")
        return a, b, None
    wide = torch.promote_types(compute, torch.float32) if merge and compute else compute
    a, b, full, parts = _read_stored(tensors, m, stage_dtypes, wide)
    if stored_parts is not None and not merge:
        stored_parts[m.name] = parts
    return a.to(where), b.to(where), None if full is None else full.to(where)


def _dense(m, dense: torch.Tensor) -> dict[str, torch.Tensor]:
    # contiguous, as the dense model's own weights (a Conv1D's transpose would not be): its state dict saves as one
    return {f"{m.name}.weight": as_stored_by(m.kind, dense).contiguous()}


def _kept(keeps_fp32, name: str, dtype, compute_dtype) -> tuple:
    """(dtype, compute dtype) of tensor ``name``: float32 for a module the model keeps in float32
    (None, as stored, stays None: such a module was stored in float32); as asked otherwise."""
    if keeps_fp32 is not None and keeps_fp32(name):
        return (None if dtype is None else torch.float32), torch.float32
    return dtype, compute_dtype


def _widened(dtype: torch.dtype | None, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A merged load multiplies in the wider of the stored dtype and the asked one, and casts the
    product once (``_cast``): bf16 factors multiplied in bf16 carry both factors' rounding into W."""
    if dtype is None:
        return factors
    return tuple(f.to(torch.promote_types(f.dtype, dtype)) for f in factors)


def _cast(dense: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return dense if dtype is None else dense.to(dtype)


def _read_pivoted(tensors: FolderTensors, m, dtype, where) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pivot rows P, coefficients C, pivot indices) of a pivoted module (``svdlora.pivoted``)."""
    b, c, rows = (tensors.get(f"{m.name}.pivoted.{k}") for k in ("B", "C", "rows"))
    if not valid_rows(rows, m.shape[0]):
        raise SvdloraError(
            f"{str(tensors.folder)!r}: {m.name}.pivoted.rows are not increasing row indices below "
            f"{m.shape[0]}: the file is corrupted; re-run `svdlora compress`"
        )
    b, c = (t.to(device=where, dtype=dtype or t.dtype) for t in (b, c))
    return b, c, rows.to(where)


def _read_stored(tensors: FolderTensors, m, stage_dtypes: list[str], dtype):
    from ..chain import read_file_tensors

    try:
        return read_file_tensors(tensors, m.name, m.ranks, stage_dtypes, m.shape, dtype)
    except KeyError as err:
        raise SvdloraError(
            f"{str(tensors.folder)!r} lacks factor {err}: the file is corrupted, re-run `svdlora compress`"
        ) from None
