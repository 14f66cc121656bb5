"""Factorization methods: (W, statistics, stage ranks) -> residual stages.

``svd`` is the sources' method (plain truncated SVD of W); ``whiten`` minimizes the layer's
output error on calibration inputs (SVD-LLM); ``fisher`` also weights each output channel by
what it is worth to the loss (``weighting.Weighting``); ``kfac`` whitens the output side with
the output-gradient Gram instead (Kronecker-factored Fisher). All run the same residual chain on
the weighted matrix.
"""

from __future__ import annotations

import torch

from ..decompose import _svd_dtype, residual_svd
from .weighting import Weighting, on_cpu_if_it_fails

METHODS = ("svd", "whiten", "fisher", "kfac")


def factorize(
    weight: torch.Tensor, ranks: list[int], weighting: Weighting | None = None, **svd_options
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Residual stages (A_j, B_j) of ``weight`` (out, in) with the given ranks, under ``weighting``.

    Example:
        >>> stages = factorize(layer.weight, [16, 16], Weighting.from_stats(stats["mlp.fc1"]))
    """
    if weighting is None or weighting.is_identity:
        return residual_svd(weight, ranks, **svd_options)
    whitened = weighting.whiten(weight.detach().to(_svd_dtype(weight)))  # float64 weights stay float64
    stages = [weighting.unwhiten(a, b) for a, b in residual_svd(whitened, ranks, **svd_options)]
    return [(a.to(weight.dtype), b.to(weight.dtype)) for a, b in stages]


def weighted_spectrum(weight: torch.Tensor, weighting: Weighting | None) -> torch.Tensor:
    """Singular values of D·W·S (float64, descending): σ_k² is what dropping triplet k costs."""
    work = weight.detach().float()
    if weighting is not None and not weighting.is_identity:
        work = weighting.whiten(work)
    if work.shape[0] < work.shape[1]:  # the same values; LAPACK takes ~2x longer on a wide matrix
        work = work.T
    return on_cpu_if_it_fails(torch.linalg.svdvals, work).double()


__all__ = ["METHODS", "Weighting", "factorize", "weighted_spectrum"]
