"""--rank-multiple: ranks rounded to a multiple of N (aligned factors for GPU kernels), budget kept."""

import pytest
import torch
from torch import nn

from svdlora import compress
from svdlora.allocate import allocate_global, allocate_ranks, factor_params
from svdlora.cli import main
from svdlora.config import CompressionConfig
from svdlora.errors import SvdloraError
from svdlora.io import load_compressed
from svdlora.targets import Target

from .conftest import TINY_MODELS

SHAPES = [(96, 64), (64, 96), (80, 80), (200, 48), (12, 40)]  # the last: budget rank below 8


def targets():
    return [Target(f"m{i}", nn.Linear(i_f, o_f), "linear", o_f, i_f) for i, (o_f, i_f) in enumerate(SHAPES)]


def stored(ts, ranks, dense, pivot):
    return sum(factor_params(t, sum(ranks[t.name]), pivot) for t in ts if t.name in ranks) + sum(
        t.params for t in ts if t.name in dense
    )


@pytest.mark.parametrize("pivot", [False, True])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_uniform_ranks_are_multiples_within_the_budget(budget, pivot):
    ts = targets()
    plain, _ = allocate_ranks(ts, CompressionConfig(budget=budget, pivot=pivot))
    ranks, dense = allocate_ranks(ts, CompressionConfig(budget=budget, pivot=pivot, rank_multiple=8))
    for name, stages in ranks.items():
        total, before = sum(stages), sum(plain[name])
        assert total == before if before < 8 else (total % 8 == 0 and before - 8 < total <= before)
    assert any(sum(ranks[n]) != sum(plain[n]) for n in ranks)  # the rounding did something
    assert stored(ts, ranks, dense, pivot) <= budget * sum(t.params for t in ts)


@pytest.mark.parametrize("pivot", [False, True])
def test_global_ranks_are_multiples_within_the_budget(pivot):
    ts = targets()
    g = torch.Generator().manual_seed(0)
    spectra = {
        t.name: torch.rand(min(t.out_features, t.in_features), generator=g).sort(descending=True).values for t in ts
    }
    ranks, dense, _ = allocate_global(ts, spectra, 0.5, 2, pivot=pivot, multiple=8)
    limits = {t.name: min(t.out_features, t.in_features) for t in ts}
    assert ranks and all(sum(r) < 8 or sum(r) == limits[n] or sum(r) % 8 == 0 for n, r in ranks.items())
    assert stored(ts, ranks, dense, pivot) <= 0.5 * sum(t.params for t in ts)
    plain, _, _ = allocate_global(ts, spectra, 0.5, 2, pivot=pivot)
    assert any(sum(r) % 8 for r in plain.values())  # unaligned without the option


@pytest.mark.parametrize("pivot", [False, True])
def test_a_multiple_no_matrix_can_hold_leaves_the_global_ranks_as_without_it(pivot):
    """The global allocator stepped a rank from 1 straight to the multiple: with a multiple larger than a matrix
    (128 here, every matrix's smaller side is below it) each matrix got rank 1 or stayed dense, where uniform
    keeps the ranks below the multiple. Below the multiple a rank now grows one at a time."""
    ts = targets()
    g = torch.Generator().manual_seed(0)
    spectra = {
        t.name: torch.rand(min(t.out_features, t.in_features), generator=g).sort(descending=True).values for t in ts
    }
    plain = allocate_global(ts, spectra, 0.5, 2, pivot=pivot)
    assert allocate_global(ts, spectra, 0.5, 2, pivot=pivot, multiple=128) == plain
    assert any(sum(r) > 1 for r in plain[0].values())


def test_rank_multiple_through_the_api_and_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    report = compress(model, CompressionConfig(budget=0.6, rank_multiple=4))
    assert all(sum(m.ranks) % 4 == 0 for m in report.factorized)
    base = tmp_path / "base"
    TINY_MODELS["llama"]().save_pretrained(base)
    out = tmp_path / "out"
    assert main(["compress", str(base), "-o", str(out), "--budget", "0.6", "--rank-multiple", "4",
                 "--calibration", "none", "--no-progress"]) == 0  # fmt: skip
    loaded = load_compressed(out)
    assert all(sum(m.ranks) % 4 == 0 for m in loaded.svdlora_report.factorized)
    assert main(["info", str(out)]) == 0
    assert "ranks of 4 or more rounded to multiples of 4" in capsys.readouterr().out
    with pytest.raises(SvdloraError, match="rank_multiple"):
        CompressionConfig(rank_multiple=0)
    with pytest.raises(SvdloraError, match="fixed rank"):
        CompressionConfig(rank=20, rank_multiple=8)
    with pytest.raises(SvdloraError, match="stage_dtypes"):
        CompressionConfig(stage_dtypes=["int8"], rank_multiple=8)


def test_a_matrix_the_share_covers_stays_dense_and_exact():
    """Rounding comes after the dense check: at budget 1.0 pivoted, every matrix stays exact."""
    ts = targets()
    plain, dense_plain = allocate_ranks(ts, CompressionConfig(budget=1.0, pivot=True))
    ranks, dense = allocate_ranks(ts, CompressionConfig(budget=1.0, pivot=True, rank_multiple=8))
    assert ranks == plain and dense.keys() == dense_plain.keys() and len(dense) == len(ts)
