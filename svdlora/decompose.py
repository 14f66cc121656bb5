"""Pure tensor math: truncated SVD, residual stages, ranks for a parameter budget.

Nothing here knows about modules or files, so allocators, calibration or quantized
stages can be swapped in without touching discovery or I/O.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch

from .errors import first_line

logger = logging.getLogger(__name__)

# float64 for small matrices removes float32 round-off at no cost; large ones use float32, which
# is what "float32 or higher" asks: LAPACK's float64 SVD of 1536x576 takes 1.8x the float32 time on
# one thread here (0.20 s vs 0.11 s, 2026-11-29; an earlier note said 25x, not reproduced), and the
# exact route is the float32 Gram eigendecomposition anyway (_gram_svd).
_FLOAT64_MAX_ELEMENTS = 1 << 16
_ERROR_BLOCK_ROWS = 256
# The float32 Gram route hands over to LAPACK where the smallest kept eigenvalue is below this
# share of the largest (see _gram_svd).
_GRAM_MIN_RATIO = 1e-4
# The Gram's lower triangle is built in column blocks of about this width: the symmetric eigensolvers
# read only that triangle, and ~100-wide blocks skip 30-37% of the product's time on one CPU thread
# (SmolLM2's 1536x576 in 6.4 ms instead of 10.1; no gain past 8 blocks). GPUs get one matmul.
_GRAM_BLOCK = 96
# projection_error's identity is used down to this relative error (below, ‖W − A·B‖ is measured):
# there its two float64 sums of float32 factors agree with the direct check to ~1e-5 (4e-6 seen).
_IDENTITY_MIN_ERROR = 0.1


def _svd_dtype(weight: torch.Tensor) -> torch.dtype:
    if weight.dtype == torch.float64 or weight.numel() <= _FLOAT64_MAX_ELEMENTS:
        return torch.float64
    return torch.float32


# --svd auto: randomized SVD (Halko et al.) where the kept rank is a small part of a large
# matrix, exact elsewhere. The sketch costs ~2(power_iterations+1)·m·n·q flops; the exact route
# (_gram_svd) one Gram matmul and an eigensolver of the smaller side. Measured here
# (benchmarks/svd_speed.py, one thread) the sketch is 1.9x faster at rank = min/4 on 4096x4096
# but slower than exact at 0.4·min, and below ~1000 columns it saves milliseconds at +2-4% error.
AUTO_MAX_RANK_FRACTION = 1 / 4
AUTO_MIN_SIZE = 1024


def choose_method(shape: tuple[int, int], rank: int, method: str = "auto", oversampling: int = 8) -> str:
    """'exact' or 'randomized' for an (out, in) matrix kept at total ``rank``; 'auto' applies the rule."""
    if method != "auto":
        return method
    small = min(shape)
    if small >= AUTO_MIN_SIZE and rank <= AUTO_MAX_RANK_FRACTION * small:
        return "randomized"
    return "exact"


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
        method: "exact" (``_gram_svd``, LAPACK's SVD where it is unsafe), "randomized" (Halko et al.,
            torch.svd_lowrank with ``oversampling`` extra columns and ``power_iterations``) or "auto"
            (``choose_method``).
    Returns:
        ``(A, B)`` with shapes (out, rank) and (rank, in), in the SVD's dtype.
    """
    work = weight.detach().to(_svd_dtype(weight))
    rank = min(rank, *work.shape)
    method = choose_method(tuple(work.shape), rank, method, oversampling)
    triplets = None
    if method == "randomized":
        triplets = _randomized_svd(work, rank, oversampling, power_iterations, generator_seed)
    if triplets is None:
        factors = _gram_svd(work, rank)
        if factors is not None:
            return factors
        triplets = _lapack_svd(work, rank)
    u, s, vh = triplets
    root = s.sqrt()
    return u * root, root[:, None] * vh


def _randomized_svd(
    work: torch.Tensor, rank: int, oversampling: int, power_iterations: int, generator_seed: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top-``rank`` (U, S, Vᵀ) from ``torch.svd_lowrank``; None where its small inner SVD does not converge
    (seen on a matrix with exactly repeated singular values), which the caller then takes exactly."""
    q = min(rank + oversampling, *work.shape)
    devices = [work.device] if work.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=generator_seed is not None):  # leave the caller's RNG alone
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        try:
            u, s, v = torch.svd_lowrank(work, q=q, niter=power_iterations)
        except torch.linalg.LinAlgError as err:
            logger.warning(
                "randomized SVD of a %s matrix failed (%s): taken exactly", tuple(work.shape), first_line(err)
            )
            return None
    return u[:, :rank], s[:rank], v[:, :rank].T


def _lapack_svd(work: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` (U, S, Vᵀ) from LAPACK's SVD (divide and conquer)."""
    if work.shape[0] < work.shape[1]:
        # LAPACK is 1.4-3x slower on wide matrices than on their transposes (measured): W = (Wᵀ)ᵀ.
        v, s, uh = torch.linalg.svd(work.T, full_matrices=False)
        return uh[:rank].T, s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _gram_svd(work: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact truncated factors from the eigenvectors of the smaller Gram matrix; None where unsafe.

    With E the top-``rank`` eigenvectors of WWᵀ (or WᵀW), Ŵ = E·EᵀW is W's best rank-``rank``
    approximation, and the row norms of EᵀW are the singular values. One matmul and a symmetric
    eigensolver take 1.6-2.8x less time than LAPACK's SVD on LLM matrices at the same error
    (benchmarks/svd_speed.py). The Gram squares the condition number: its eigenvalues carry an
    absolute error of about ε·λ₁, so the kept subspace is only trusted where the smallest kept
    eigenvalue stands well above that: λ_k >= ``_GRAM_MIN_RATIO``·λ₁. On an outlier spectrum the
    error above LAPACK's was 3e-6 relative at λ_k/λ₁ = 1.1e-4, 9e-5 at 2.8e-5 and 0.5% at 3e-6;
    SmolLM2's matrices stay above 1.2e-3 at budget 0.5 and 1.7e-4 at 0.8 (benchmarks/gram_route.py).
    float64 matrices, and the others, go to LAPACK. W is scaled to a maximum of 1 first, so that
    squaring neither overflows nor underflows float32.
    """
    low, high = torch.aminmax(work) if work.numel() else (torch.zeros(()), torch.zeros(()))
    scale = max(-low.item(), high.item())
    if work.dtype == torch.float64 or not rank or not 0 < scale < math.inf:
        return None
    work = work / scale
    wide = work.shape[0] <= work.shape[1]
    values, vectors = torch.linalg.eigh(_lower_gram(work))
    top, kth = values[-1].item(), values[-rank].item()
    if not (math.isfinite(top) and top > 0 and kth >= _GRAM_MIN_RATIO * top):
        return None
    basis = vectors[:, -rank:]
    projected = basis.T @ work if wide else work @ basis  # Σ·Vᵀ rows (wide) or U·Σ columns (tall)
    singular = torch.linalg.vector_norm(projected, dim=1 if wide else 0)
    order = torch.argsort(singular, descending=True, stable=True)
    basis, singular = basis[:, order], singular[order]
    projected = projected[order] if wide else projected[:, order]
    root = singular.sqrt()
    inverse = torch.where(root > 0, 1 / root, torch.zeros_like(root))  # a zero singular value: zero factors
    back = math.sqrt(scale)  # A·B = E·Eᵀ(W/scale)·scale
    if wide:
        return basis * (root * back), (inverse * back)[:, None] * projected
    return projected * (inverse * back), (root * back)[:, None] * basis.T


def _lower_gram(work: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of W's smaller side (WWᵀ if wide, else WᵀW), exact in its lower triangle only.

    What eigh/eigvalsh read (their default UPLO="L"); on a CPU, above the diagonal blocks it holds zeros.
    """
    side = work if work.shape[0] <= work.shape[1] else work.T  # Gram = side · sideᵀ
    size = side.shape[0]
    blocks = max(1, round(size / _GRAM_BLOCK))
    if work.device.type != "cpu" or blocks == 1:
        return side @ side.T
    gram = torch.zeros(size, size, dtype=side.dtype)
    edges = [size * i // blocks for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        torch.mm(side[start:stop], side[:stop].T, out=gram[start:stop, :stop])
    return gram


def residual_svd(
    weight: torch.Tensor, ranks: list[int], method: str = "exact", explicit: bool = False, **svd_options
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stage j is the truncated SVD of what stages < j left out: W − Σ_{i<j} A_i B_i.

    With exact SVD the residual after the top-r triplets has the remaining triplets as its
    SVD (Eckart–Young), so the stages are read off one decomposition: the same factors as
    the explicit loop up to round-off (tested), at 1/n of the cost. A randomized SVD is
    also computed once, for the total rank (one sketch of rank Σr_j spans at least as much
    of W as n sketches of rank r_j, at 1/n of the sketching cost), and split the same way.
    ``explicit=True`` runs the loop, where each stage sees the previous stages' error.
    Ranks past min(out, in) in total are cut from the last stages (a stage left at 0 is dropped), as
    ``truncated_svd`` clips its rank: both routes give the same stages, none of them empty.
    """
    ranks = _clipped_ranks(ranks, min(weight.shape))
    if not explicit:
        a, b = truncated_svd(weight, sum(ranks), method=method, **svd_options)
        bounds = torch.tensor([0, *ranks]).cumsum(0).tolist()
        return [(a[:, i:j], b[i:j]) for i, j in itertools.pairwise(bounds)]
    residual = weight.detach().to(_svd_dtype(weight)).clone()
    stages = []
    for stage, rank in enumerate(ranks):
        a, b = truncated_svd(residual, rank, method=method, **stage_options(svd_options, stage))
        stages.append((a, b))
        residual -= a @ b
    return stages


def stage_options(svd_options: dict, stage: int) -> dict:
    """``svd_options`` for stage ``stage`` of a loop over residuals: the randomized SVD's seed moved on by
    the stage, so that each stage draws its own sketch Ω. With one seed every stage drew the same Ω, which
    the residual left by a sketch of it maps into the q − r directions that stage dropped: the second rank-15
    stage of a 300x200 matrix (no power iterations, no oversampling) removed 3% of what the exact stage would,
    66% with its own draw."""
    seed = svd_options.get("generator_seed")
    return svd_options if seed is None else {**svd_options, "generator_seed": seed + stage}


def _clipped_ranks(ranks: list[int], limit: int) -> list[int]:
    """Stage ranks whose total is at most ``limit``: later stages cut first, stages left at 0 dropped."""
    bounds = [min(limit, total) for total in itertools.accumulate(ranks)]
    return [j - i for i, j in itertools.pairwise([0, *bounds]) if j > i]


def optimal_relative_error(weight: torch.Tensor, rank: int) -> float:
    """‖W − W_k‖_F / ‖W‖_F of the best rank-k approximation (Eckart–Young), without an SVD.

    Σ_{i>k} σ_i² = ‖W‖² − Σ_{i<=k} λ_i(G), with G the Gram matrix of the smaller side:
    one matmul and a symmetric eigenvalue solve (no vectors) cost a fraction of an SVD
    (0.5 s vs 2.4 s on 2048x2048 here), so randomized runs can report their cost.
    """
    work = weight.detach().to(_svd_dtype(weight))
    eig = torch.linalg.eigvalsh(_lower_gram(work)).double().clamp_min(0)
    total = _squared_norm(work)
    kept = eig.flip(0)[: min(rank, eig.numel())].sum().item()
    return (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0


def projection_error(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float | None:
    """‖W − A·B‖_F / ‖W‖_F of SVD factors without forming A·B; None where that is not precise.

    Every unweighted route here (exact, Gram, randomized, and residual stages of them) returns
    A = U√S, B = √S·Vᵀ with orthonormal U and V, and A·B = U·Uᵀ·W projects W. Then
    ‖W − A·B‖² = ‖W‖² − ‖A·B‖², and ‖A·B‖² = Σ σᵢ² = Σ ‖A[:, i]‖²·‖B[i]‖²: O(R·(m+n)) work
    instead of the m·n·R of forming A·B (the largest part of the check's cost in compress).
    The difference of the two sums loses digits as they approach each other: below an error of
    ``_IDENTITY_MIN_ERROR`` (and for factors rounded below float32) the caller measures A·B.
    """
    if a.dtype not in (torch.float32, torch.float64) or b.dtype != a.dtype:
        return None
    total = _squared_norm(weight.detach())
    kept = (a.detach().double().square().sum(0) * b.detach().double().square().sum(1)).sum().item()
    if not total > 0:
        return None
    ratio = (total - kept) / total
    return ratio**0.5 if ratio >= _IDENTITY_MIN_ERROR**2 else None


def _squared_norm(work: torch.Tensor) -> float:
    """‖W‖_F² in float64, a block of rows at a time."""
    return sum(
        work[i : i + _ERROR_BLOCK_ROWS].double().square().sum().item()
        for i in range(0, work.shape[0], _ERROR_BLOCK_ROWS)
    )


def split_rank(total_rank: int, submatrices: int) -> list[int]:
    """Split a total rank over the stages as evenly as possible, earlier stages first.

    Stages that would get rank 0 are dropped, so a rank-2 budget with 3 submatrices gives [1, 1].
    """
    base, extra = divmod(total_rank, submatrices)
    ranks = [base + (1 if j < extra else 0) for j in range(submatrices)]
    return [r for r in ranks if r > 0]


def budget_values(budget: float, values: int) -> float:
    """The values ``budget`` allows of ``values``: budget·values, with a slack that keeps a product that is a
    whole number (0.7·1536·7680 = 896·9216) from losing what fits it exactly to round-off (0.7 is
    0.69999999999999996 in binary). It is relative: the round-off grows with the product, and an absolute 1e-9
    gave 1536x7680 rank 895 at budget 0.7."""
    return budget * values * (1 + 1e-12)


def rank_for_budget(
    out_features: int, in_features: int, budget: float, pivot: bool = False, index_values: int = 0
) -> int:
    """Largest total rank R whose factors, R·(out+in) values (pivoted: R·(out+in−R), plus ``index_values``
    per rank for its pivot index, ``pivoted.pivoted_values``), fit in budget·out·in."""
    allowed = budget_values(budget, out_features * in_features)
    if not pivot:
        return int(allowed / (out_features + in_features))
    s = out_features + in_features + index_values  # the smaller root of R² − s·R + allowed = 0
    rank = int((s - math.sqrt(max(s * s - 4 * allowed, 0.0))) / 2)
    while (rank + 1) * (s - rank - 1) <= allowed and rank < min(out_features, in_features):
        rank += 1  # round-off in the square root
    while rank * (s - rank) > allowed:
        rank -= 1
    return min(rank, out_features, in_features)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in float64; 0 for an all-zero W reconstructed exactly.

    ``approximation`` may be the factors (A, B): Ŵ = A·B is then formed a block of rows at a
    time, so the check holds a few MB instead of two float64 copies of a large matrix.
    """
    w = weight.detach()
    diff2 = norm2 = 0.0
    for i in range(0, w.shape[0], _ERROR_BLOCK_ROWS):
        rows = w[i : i + _ERROR_BLOCK_ROWS].double()
        if isinstance(approximation, tuple):
            a, b = approximation
            approx = a.detach()[i : i + _ERROR_BLOCK_ROWS] @ b.detach()
        else:
            approx = approximation.detach()[i : i + _ERROR_BLOCK_ROWS]
        diff2 += (rows - approx.double()).square().sum().item()
        norm2 += rows.square().sum().item()
    diff, norm = diff2**0.5, norm2**0.5
    return diff / norm if norm > 0 else float(diff > 0)


@dataclass
class Factorization:
    """A matrix's stages stacked into one pair, and what they cost in accuracy."""

    a: torch.Tensor  # (out, Σr_j), the weight's dtype
    b: torch.Tensor  # (Σr_j, in)
    ranks: list[int]
    method: str  # "exact" or "randomized": what "auto" chose
    rel_error: float  # ‖W − A·B‖_F / ‖W‖_F
    exact_error: float | None  # the same for the exact SVD at this rank (None: not computed)


def factorize(
    weight: torch.Tensor,
    ranks: list[int],
    method: str = "auto",
    reference: bool = True,
    device: str | torch.device | None = None,
    weighting=None,
    **svd_options,
) -> Factorization:
    """Residual SVD stages of ``weight`` (out, in), stacked, in the weight's dtype and device.

    The one function both in-memory and streamed compression call, so both write the same bits.
    ``reference`` computes the exact SVD's error for randomized factors (``optimal_relative_error``).
    ``device`` runs the SVD there (e.g. "cuda" while the model stays on the CPU); when the
    device's solver fails (cuSOLVER does not always converge) the matrix is done on the CPU.
    ``weighting`` (a ``methods.Weighting`` from calibration) factorizes D·W·S and maps the stages
    back (``methods.factorize``); the error is still measured on W itself, and no exact-SVD
    reference is computed for it (Eckart–Young's optimum is in the weighted metric, not in W's).
    """
    weighted = weighting is not None and not weighting.is_identity
    home = weight.device
    if device is not None and torch.device(device) != home:
        try:
            f = factorize(weight.to(device), ranks, method, reference, weighting=weighting, **svd_options)
        except (torch.linalg.LinAlgError, RuntimeError) as err:  # includes CUDA solver failures
            logger.warning("SVD on %s failed (%s): this matrix is factorized on %s", device, err, home)
        else:
            f.a, f.b = f.a.to(home), f.b.to(home)
            return f
    chosen = choose_method(
        tuple(weight.shape), min(sum(ranks), *weight.shape), method, svd_options.get("oversampling", 8)
    )
    if weighted:
        from .methods import factorize as weighted_stages  # methods builds on this module

        stages = weighted_stages(weight, ranks, weighting, method=chosen, **svd_options)
    else:
        stages = residual_svd(weight, ranks, method=chosen, **svd_options)
    a = torch.cat([sa for sa, _ in stages], dim=1).to(weight.dtype)
    b = torch.cat([sb for _, sb in stages], dim=0).to(weight.dtype)
    with torch.no_grad():
        error = None if weighted else projection_error(weight, a, b)
        if error is None:
            error = relative_error(weight, (a, b))
    if chosen == "exact":
        exact = error
    else:
        exact = optimal_relative_error(weight, a.shape[1]) if reference and not weighted else None
    return Factorization(a, b, [sa.shape[1] for sa, _ in stages], chosen, error, exact)
