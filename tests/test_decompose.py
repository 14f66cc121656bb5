"""The tensor math: SVD factors, residual stages, rank splitting, budget ranks."""

import pytest
import torch

from svdlora.decompose import rank_for_budget, relative_error, residual_svd, split_rank, truncated_svd


def low_rank_plus_noise(out_f=40, in_f=30, rank=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)


def test_full_rank_reconstruction_is_exact():
    w = low_rank_plus_noise()
    a, b = truncated_svd(w, rank=30)
    assert torch.allclose(a @ b, w.double(), atol=1e-10)
    assert relative_error(w, a @ b) < 1e-12


def test_factors_are_balanced():
    w = low_rank_plus_noise()
    a, b = truncated_svd(w, rank=5)
    # A = U√S and B = √S Vᵀ: both carry the same column/row norms, √σ_i.
    assert torch.allclose(a.norm(dim=0), b.norm(dim=1), atol=1e-10)


@pytest.mark.parametrize("ranks", [[3, 3, 3], [4, 2], [1, 1, 1, 1, 1]])
def test_stages_equal_one_svd_of_total_rank(ranks):
    """Eckart–Young: exact residual stages of ranks r_j add up to the rank-Σr_j truncated SVD."""
    w = low_rank_plus_noise(seed=1)
    a, b = truncated_svd(w, rank=sum(ranks))
    for explicit in (True, False):
        stages = residual_svd(w, ranks, explicit=explicit)
        assert [s[0].shape[1] for s in stages] == ranks
        total = sum(sa @ sb for sa, sb in stages)
        assert torch.allclose(total, a @ b, atol=1e-9), explicit


@pytest.mark.parametrize(("ranks", "cut"), [([5, 1], [4]), ([3, 3], [3, 1]), ([2, 2, 2], [2, 2])])
def test_stage_ranks_past_the_matrix_rank_are_cut_not_left_empty(ranks, cut):
    """A 4x6 matrix holds rank 4 at most: both routes cut the last stages there and drop a stage left at 0,
    so a layer can be built from them."""
    from torch import nn

    from svdlora.layers import LowRankLinear

    w = low_rank_plus_noise(out_f=4, in_f=6, rank=4, seed=5)
    for explicit in (True, False):
        stages = residual_svd(w, ranks, explicit=explicit)
        assert [a.shape[1] for a, _ in stages] == cut, explicit
        assert torch.allclose(sum(a @ b for a, b in stages), w.double(), atol=1e-9), explicit
    assert LowRankLinear.from_dense(nn.Linear(6, 4), ranks).ranks == cut


def test_explicit_loop_matches_one_decomposition_stage_by_stage():
    w = low_rank_plus_noise(seed=2)
    fast = residual_svd(w, [4, 4, 4])
    slow = residual_svd(w, [4, 4, 4], explicit=True)
    for (fa, fb), (sa, sb) in zip(fast, slow, strict=True):
        assert torch.allclose(fa @ fb, sa @ sb, atol=1e-9)


def test_each_stage_factorizes_the_residual():
    w = low_rank_plus_noise(seed=3)
    stages = residual_svd(w, [5, 5], method="randomized", generator_seed=0, power_iterations=0, oversampling=0)
    first = stages[0][0] @ stages[0][1]
    residual = w.double() - first
    # Randomized stages are approximate: the second stage must still reduce the residual.
    second = stages[1][0] @ stages[1][1]
    assert torch.linalg.matrix_norm(residual - second) < torch.linalg.matrix_norm(residual)


def test_each_explicit_randomized_stage_draws_its_own_sketch():
    """With one seed for all stages, stage 2 sketched the residual with stage 1's Ω, which that residual maps to
    (nearly) nothing: it removed 3% of what an exact rank-15 stage removes from the same residual."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.97 ** torch.arange(200, dtype=torch.float64)
    options = {"method": "randomized", "generator_seed": 0, "power_iterations": 0, "oversampling": 0}
    (a1, b1), (a2, b2) = residual_svd(w, [15, 15], explicit=True, **options)
    residual = w - a1 @ b1
    removed = residual.square().sum() - (residual - a2 @ b2).square().sum()
    exact = torch.linalg.svdvals(residual)[:15].square().sum()
    assert removed > 0.5 * exact, (removed / exact).item()


def test_randomized_stages_differ_from_exact():
    w = low_rank_plus_noise(seed=4)
    exact = sum(a @ b for a, b in residual_svd(w, [3, 3]))
    rand = sum(
        a @ b
        for a, b in residual_svd(w, [3, 3], method="randomized", generator_seed=0, power_iterations=0, oversampling=0)
    )
    assert not torch.allclose(exact, rand, atol=1e-6)
    assert relative_error(w, rand) >= relative_error(w, exact) - 1e-12  # exact is optimal


def test_split_rank():
    assert split_rank(10, 3) == [4, 3, 3]
    assert split_rank(2, 3) == [1, 1]
    assert split_rank(9, 1) == [9]


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 1.0])
def test_rank_for_budget_fits(budget):
    for out_f, in_f in [(64, 64), (1536, 576), (10, 500), (7, 3)]:
        r = rank_for_budget(out_f, in_f, budget)
        assert r * (out_f + in_f) <= budget * out_f * in_f + 1e-6
        assert (r + 1) * (out_f + in_f) > budget * out_f * in_f


@pytest.mark.parametrize(
    ("out_f", "in_f", "budget", "pivot", "rank"),
    [(1536, 7680, 0.7, False, 896), (768, 15360, 0.7, False, 512), (1792, 18240, 0.7, True, 1216)],
)
def test_a_budget_that_fits_a_rank_exactly_gets_it_on_large_matrices(out_f, in_f, budget, pivot, rank):
    """budget·out·in equals the rank's cost exactly (0.7·1536·7680 = 896·9216): its float product fell below
    that by more than the absolute 1e-9 slack, and the rank was lost (895, 511, 1215)."""
    assert rank_for_budget(out_f, in_f, budget, pivot) == rank


def test_large_matrices_use_float32_and_keep_accuracy():
    w = torch.randn(600, 300)
    a, b = truncated_svd(w, rank=300)
    assert a.dtype == torch.float32
    assert relative_error(w, a @ b) < 1e-5
