"""The residual chain with stored precision: stage j+1 factorizes what stages <= j left *as stored*.

With every stage in one float dtype the chain is one SVD in disguise (``decompose.residual_svd``).
Once a stage is quantized, its rounding error joins the residual and the next stage repairs
it, so the number of submatrices starts to matter. A ``full-…`` first stage stores the whole
matrix quantized (the LQER/QERA shape); the low-rank stages then model its error.

Generic over a weighting (anything with ``whiten(W)``, ``unwhiten(A', B')`` and ``is_identity``):
each low-rank stage is the truncated SVD of the whitened residual, mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decompose import _svd_dtype, truncated_svd
from .quantize import StageFormat, dequantize, quantize


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
    **svd_options,
) -> list[Stage]:
    """Stages of ``weight`` (out, in): ``formats[j]`` stores stage j, of rank ``ranks[j]``
    (ignored for a ``full`` stage). Each stage sees the residual of the previous ones as stored.
    """
    out_features, in_features = weight.shape
    residual = weight.detach().to(_svd_dtype(weight)).clone()
    whiten = weighting is not None and not weighting.is_identity
    stages = []
    for rank, fmt in zip(ranks, formats, strict=True):
        if fmt.full:
            parts = {"W": quantize(residual, fmt)}
            full = dequantize(parts["W"], fmt, in_features, residual.dtype)
            stages.append(Stage(fmt, parts, full=full))
            residual -= full
            continue
        target = weighting.whiten(residual) if whiten else residual
        a, b = truncated_svd(target, rank, method=method, **svd_options)
        if whiten:
            a, b = weighting.unwhiten(a, b)
        parts = store_factors(a, b, fmt)
        a, b = load_factors(parts, fmt, out_features, in_features, residual.dtype)
        stages.append(Stage(fmt, parts, a=a, b=b))
        residual -= a @ b
    return stages
