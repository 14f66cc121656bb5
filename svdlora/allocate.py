"""Rank allocation: how many singular triplets each targeted matrix gets.

The default gives every matrix the same fraction of its own parameters, then re-balances
when some matrices must stay dense. A future allocator (e.g. by calibration loss) only
has to return the same mapping.
"""

from __future__ import annotations

from .config import CompressionConfig
from .decompose import rank_for_budget, split_rank
from .errors import SvdloraError
from .targets import Target


def factor_params(target: Target, total_rank: int) -> int:
    return total_rank * (target.out_features + target.in_features)


def allocate_ranks(targets: list[Target], config: CompressionConfig) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per-module stage ranks, and the targets that stay dense (with the reason).

    Budget mode guarantees Σ factor params + Σ dense params <= budget·Σ targeted params.
    """
    if config.rank is not None:
        return _fixed_rank(targets, config)
    allowed = config.budget * sum(t.params for t in targets)
    dense: dict[str, str] = {}
    while True:
        factorized = [t for t in targets if t.name not in dense]
        spent_dense = sum(t.params for t in targets if t.name in dense)
        if not factorized or allowed - spent_dense <= 0:
            raise SvdloraError(
                f"budget {config.budget} is too small to factorize any matrix "
                f"(with {len(dense)} left dense): raise --budget or --exclude the smallest layers"
            )
        # Dense matrices are paid for in full, so the rest share what is left, pro rata.
        share = min(1.0, (allowed - spent_dense) / sum(t.params for t in factorized))
        ranks, newly_dense = {}, {}
        for t in factorized:
            total = min(rank_for_budget(t.out_features, t.in_features, share), t.out_features, t.in_features)
            if total == 0:
                newly_dense[t.name] = f"budget share {share:.3g} is below rank 1"
            elif factor_params(t, total) >= t.params:
                newly_dense[t.name] = "factors would not be smaller than the dense matrix"
            else:
                ranks[t.name] = split_rank(total, config.submatrices)
        if not newly_dense:
            return ranks, dense
        dense.update(newly_dense)


def _fixed_rank(targets: list[Target], config: CompressionConfig) -> tuple[dict[str, list[int]], dict[str, str]]:
    ranks, dense = {}, {}
    for t in targets:
        total = min(config.rank, t.out_features, t.in_features)
        if factor_params(t, total) >= t.params:
            dense[t.name] = f"rank {total} would not be smaller than the dense matrix"
        else:
            ranks[t.name] = split_rank(total, config.submatrices)
    return ranks, dense
