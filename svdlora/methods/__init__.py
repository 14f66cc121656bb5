"""Factorization methods: (W, statistics, stage ranks) -> residual stages.

``svd`` is the sources' method (plain truncated SVD of W); ``whiten`` minimizes the layer's
output error on calibration inputs (SVD-LLM); ``fisher`` also weights each output channel by
what it is worth to the loss (``weighting.Weighting``); ``kfac`` whitens the output side with
the output-gradient Gram instead (Kronecker-factored Fisher). All run the same residual chain on
the weighted matrix.
"""

from __future__ import annotations

import torch

from ..calibration import product_dtype
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
    """Singular values of D·W·S (float64, descending): σ_k² is what dropping triplet k costs. Taken in
    ``product_dtype`` as the statistics: a float64 model's would otherwise be ~3e-7 off (its estimated losses too)."""
    work = weight.detach().to(product_dtype(weight))
    if weighting is not None and not weighting.is_identity:
        work = weighting.whiten(work)
    if work.shape[0] < work.shape[1]:  # the same values; LAPACK takes ~2x longer on a wide matrix
        work = work.T
    return on_cpu_if_it_fails(torch.linalg.svdvals, work).double()


# What a weighted spectrum measures, most complete first: the loss-weighted D·W·S, W·S without usable gradient
# statistics (the loss does not reach the layer, or its gradients are not finite), D·W without a usable input Gram,
# W without statistics.
SPECTRUM_UNITS = ("D·W·S", "W·S", "D·W", "W")


def spectrum_units(weighting: Weighting | None) -> str:
    """Which of ``SPECTRUM_UNITS`` ``weighted_spectrum`` measures under ``weighting``: spectra in different units
    are not comparable (``allocate.allocate_comparable``)."""
    left = weighting is not None and weighting.left is not None
    right = weighting is not None and weighting.right is not None
    return ("D·" if left else "") + "W" + ("·S" if right else "")


__all__ = ["METHODS", "SPECTRUM_UNITS", "Weighting", "factorize", "spectrum_units", "weighted_spectrum"]
