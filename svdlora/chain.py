"""The residual chain with stored precision: stage j+1 factorizes what stages <= j left *as stored*.

With every stage in one float dtype the chain is one SVD in disguise (``decompose.residual_svd``).
Once a stage is quantized, its rounding error joins the residual and the next stage repairs
it, so the number of submatrices starts to matter. A ``full-…`` first stage stores the whole
matrix quantized (the LQER/QERA shape); the low-rank stages then model its error.

Generic over a weighting (anything with ``whiten(W)``, ``unwhiten(A', B')`` and ``is_identity``):
each low-rank stage is the truncated SVD of the whitened residual, mapped back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .decompose import _svd_dtype, stage_options, truncated_svd
from .quantize import StageFormat, dequantize, parse_format, quantize

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stored stage: its format, the tensors as written to disk, and what they read back as."""

    fmt: StageFormat
    parts: dict[str, dict[str, torch.Tensor]]  # {"A": ..., "B": ...} (A stored as Aᵀ) or {"W": ...} for full
    a: torch.Tensor | None = None  # (out, rank), dequantized
    b: torch.Tensor | None = None  # (rank, in), dequantized
    full: torch.Tensor | None = None  # (out, in), dequantized full-rank stage

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def product(self) -> torch.Tensor:
        return self.full if self.full is not None else self.a @ self.b


def store_factors(a: torch.Tensor, b: torch.Tensor, fmt: StageFormat) -> dict[str, dict[str, torch.Tensor]]:
    """The stored parts of one low-rank stage: Aᵀ and B, one scale row per singular component."""
    return {"A": quantize(a.T, fmt), "B": quantize(b, fmt)}


def load_factors(
    parts: dict[str, dict[str, torch.Tensor]], fmt: StageFormat, out_features: int, in_features: int, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in ``dtype`` from ``store_factors``' parts."""
    a = dequantize(parts["A"], fmt, out_features, dtype).T
    return a, dequantize(parts["B"], fmt, in_features, dtype)


def quantized_chain(
    weight: torch.Tensor,
    ranks: list[int],
    formats: list[StageFormat],
    weighting=None,
    method: str = "exact",
    base: Stage | None = None,
    **svd_options,
) -> list[Stage]:
    """Stages of ``weight`` (out, in): ``formats[j]`` stores stage j, of rank ``ranks[j]``
    (ignored for a ``full`` stage). Each stage sees the residual of the previous ones as stored.
    ``base``: a full first stage already stored, used as it is (the refit keeps the quantized
    weight and refits only the low-rank repair of it).
    """
    out_features, in_features = weight.shape
    residual = weight.detach().to(_svd_dtype(weight)).clone()
    whiten = weighting is not None and not weighting.is_identity
    stages = []
    for stage, (rank, fmt) in enumerate(zip(ranks, formats, strict=True)):
        if fmt.full:
            if base is not None:
                parts, full = base.parts, base.full.to(residual.dtype)
            else:
                parts = {"W": quantize(residual, fmt)}
                full = dequantize(parts["W"], fmt, in_features, residual.dtype)
            stages.append(Stage(fmt, parts, full=full))
            residual -= full
            continue
        target = weighting.whiten(residual) if whiten else residual
        a, b = truncated_svd(target, rank, method=method, **stage_options(svd_options, stage))
        if whiten:
            a, b = weighting.unwhiten(a, b)
        parts = store_factors(a, b, fmt)
        a, b = load_factors(parts, fmt, out_features, in_features, residual.dtype)
        stages.append(Stage(fmt, parts, a=a, b=b))
        residual -= a @ b
    return stages


# ---------------------------------------------------------------- file tensors
# Names in model.safetensors, for module M and stage j (README, "File format"):
#   float stage:      M.stage<j>.A (out, rank), M.stage<j>.B (rank, in), in the stage's dtype
#   quantized stage:  M.stage<j>.A.q / .A.scales [/ .A.zeros] holding Aᵀ (rank, out), and the same for B
#   full first stage: M.stage0.W.q / .W.scales [/ .W.zeros] holding the whole (out, in) matrix


def file_tensors(name: str, layer) -> dict[str, torch.Tensor]:
    """The tensors a layer with ``stage_dtypes`` writes: each stage as stored when it still matches the
    layer (compression, loading), else that stage quantized again (e.g. after healing)."""
    formats = [parse_format(d) for d in layer.stage_dtypes]
    stored, changed = _current_stages(layer, formats)
    if changed and layer.stored is not None:
        logger.warning("%s changed since it was quantized (e.g. healed): its stages are quantized again", name)
    out = {}
    for j, (fmt, parts) in enumerate(zip(formats, stored, strict=True)):
        for key, tensors in parts.items():
            for suffix, tensor in tensors.items():
                if fmt.kind == "float":  # the old layout: A as (out, rank)
                    tensor = tensor.T if key == "A" else tensor
                    out[f"{name}.stage{j}.{key}"] = tensor
                else:
                    out[f"{name}.stage{j}.{key}.{suffix}"] = tensor
    return out


def read_file_tensors(
    tensors: dict[str, torch.Tensor], name: str, ranks: list[int], stage_dtypes: list[str], shape, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
    """(stacked A, stacked B, full stage or None, stored parts) of one module; pops what it reads.

    Raises KeyError naming the first missing tensor."""
    out_features, in_features = shape
    formats = [parse_format(d) for d in stage_dtypes]
    a_parts, b_parts, full, stored = [], [], None, []
    for j, fmt in enumerate(formats):
        keys = ("W",) if fmt.full else ("A", "B")
        suffixes = ("",) if fmt.kind == "float" else ("q", "scales", "zeros") if fmt.kind == "int4" else ("q", "scales")
        parts = {}
        for key in keys:
            parts[key] = {}
            for suffix in suffixes:
                file_key = f"{name}.stage{j}.{key}" + (f".{suffix}" if suffix else "")
                if file_key not in tensors:
                    raise KeyError(file_key)
                tensor = tensors.pop(file_key)
                parts[key][suffix] = tensor.T if (fmt.kind == "float" and key == "A") else tensor
        stored.append({k: {s: t.cpu() for s, t in v.items()} for k, v in parts.items()})
        if fmt.full:
            full = dequantize(parts["W"], fmt, in_features, dtype)
            continue
        a, b = load_factors(parts, fmt, out_features, in_features, dtype)
        a_parts.append(a)
        b_parts.append(b)
    device = full.device if full is not None else a_parts[0].device
    a = torch.cat(a_parts, dim=1) if a_parts else torch.empty(out_features, 0, dtype=dtype, device=device)
    b = torch.cat(b_parts, dim=0) if b_parts else torch.empty(0, in_features, dtype=dtype, device=device)
    return a, b, full, stored


def requantize(layer) -> None:
    """Make a layer with ``stage_dtypes`` hold what its folder will: stages whose factors changed
    (healing trains them in full precision) are quantized again, and the layer takes the values they
    read back as, so that the model in memory (``compress --eval`` measures it) is the saved one."""
    formats = [parse_format(d) for d in layer.stage_dtypes]
    stored, _ = _current_stages(layer, formats)
    low = [(fmt, parts) for fmt, parts in zip(formats, stored, strict=True) if not fmt.full]
    with torch.no_grad():
        for (a, b), (fmt, parts) in zip(layer.stages() if layer.ranks else [], low, strict=True):
            back_a, back_b = load_factors(parts, fmt, layer.out_features, layer.in_features, a.dtype)
            a.copy_(back_a)
            b.copy_(back_b)
    layer.stored = stored


def _current_stages(layer, formats: list[StageFormat]) -> tuple[list, bool]:
    """Each stage's parts to write, and whether any had to be quantized again: a stage whose stored
    parts still read back as the layer's weights bit for bit keeps them; another (healed factors, no
    stored parts) is quantized from the layer. Per stage, because quantizing dequantized int4 values
    again is not the identity (the range moves to the grid's ends: another scale and zero point), so
    an untrained full-int4 stage must keep its bits when the repair stages after it were healed."""
    stored = layer.stored if layer.stored is not None else [None] * len(formats)
    pairs = [(a.detach().cpu(), b.detach().cpu()) for a, b in layer.stages()] if layer.ranks else []
    stages, changed = [], False
    with torch.no_grad():
        for fmt, parts in zip(formats, stored, strict=True):
            if fmt.full:
                weight = layer.full.detach().cpu()
                if parts is None or not torch.equal(
                    dequantize(parts["W"], fmt, layer.in_features, weight.dtype), weight
                ):
                    parts, changed = {"W": quantize(weight, fmt)}, True
            else:
                a, b = pairs.pop(0)
                back = (
                    None if parts is None else load_factors(parts, fmt, layer.out_features, layer.in_features, a.dtype)
                )
                if back is None or not (torch.equal(back[0], a) and torch.equal(back[1], b)):
                    parts, changed = store_factors(a, b, fmt), True
            stages.append(parts)
    return stages, changed
