"""Pure tensor math: truncated SVD, residual stages, ranks for a parameter budget.

Nothing here knows about modules or files, so allocators, calibration or quantized
stages can be swapped in without touching discovery or I/O.
"""

from __future__ import annotations

import torch

# SVD in float64 for small matrices is cheap and removes float32 round-off from the
# equivalence tests; large matrices use float32, which is what "float32 or higher" asks.
_FLOAT64_MAX_ELEMENTS = 1 << 20


def _svd_dtype(weight: torch.Tensor) -> torch.dtype:
    if weight.dtype == torch.float64 or weight.numel() <= _FLOAT64_MAX_ELEMENTS:
        return torch.float64
    return torch.float32


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    method: str = "exact",
    oversampling: int = 8,
    power_iterations: int = 2,
    generator_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``weight`` (out, in), split evenly: A = U√S, B = √S Vᵀ.

    Args:
        weight: the matrix, any float dtype; the SVD runs in float32 or float64.
        rank: number of singular triplets to keep (clipped to min(out, in)).
        method: "exact" (LAPACK) or "randomized" (Halko et al., torch.svd_lowrank).
    Returns:
        ``(A, B)`` with shapes (out, rank) and (rank, in), in the SVD's dtype.
    """
    work = weight.detach().to(_svd_dtype(weight))
    rank = min(rank, *work.shape)
    if method == "randomized":
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        q = min(rank + oversampling, *work.shape)
        u, s, v = torch.svd_lowrank(work, q=q, niter=power_iterations)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return u * root, root[:, None] * vh


def residual_svd(
    weight: torch.Tensor, ranks: list[int], **svd_options
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stage j is the truncated SVD of what stages < j left out: W − Σ_{i<j} A_i B_i.

    With exact SVD the stages together equal one truncated SVD of rank Σ ranks
    (Eckart–Young); they differ once a stage is approximate (randomized SVD).
    """
    residual = weight.detach().to(_svd_dtype(weight)).clone()
    stages = []
    for rank in ranks:
        a, b = truncated_svd(residual, rank, **svd_options)
        stages.append((a, b))
        residual -= a @ b
    return stages


def split_rank(total_rank: int, submatrices: int) -> list[int]:
    """Split a total rank over the stages as evenly as possible, earlier stages first.

    Stages that would get rank 0 are dropped, so a rank-2 budget with 3 submatrices gives [1, 1].
    """
    base, extra = divmod(total_rank, submatrices)
    ranks = [base + (1 if j < extra else 0) for j in range(submatrices)]
    return [r for r in ranks if r > 0]


def rank_for_budget(out_features: int, in_features: int, budget: float) -> int:
    """Largest total rank R whose factors, R·(out+in) values, fit in budget·out·in."""
    # The epsilon keeps e.g. 0.3·n exactly representable budgets from losing a rank to round-off.
    return int(budget * out_features * in_features / (out_features + in_features) + 1e-9)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in float64; 0 for an all-zero W reconstructed exactly."""
    w = weight.detach().double()
    diff = torch.linalg.matrix_norm(w - approximation.detach().double()).item()
    norm = torch.linalg.matrix_norm(w).item()
    return diff / norm if norm > 0 else float(diff > 0)
