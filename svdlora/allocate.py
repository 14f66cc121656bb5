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

    Budget mode guarantees Σ factor params + Σ dense params <= budget·Σ targeted params:
    a matrix whose share would buy factors at least as large as itself stays dense (exact, and
    no dearer); a matrix whose share is below rank 1 gets rank 1, and the others share the rest.
    """
    if config.rank is not None:
        return _fixed_rank(targets, config)
    allowed = config.budget * sum(t.params for t in targets)
    floor: set[str] = set()  # matrices held at rank 1 because their share is smaller
    while True:
        rest = [t for t in targets if t.name not in floor]
        left = allowed - sum(factor_params(t, 1) for t in targets if t.name in floor)
        if left < 0 or (rest and left <= 0):
            raise SvdloraError(
                f"budget {config.budget} is too small: even rank 1 for every targeted matrix needs more; "
                "raise --budget or --exclude the smallest layers"
            )
        share = min(1.0, left / sum(t.params for t in rest)) if rest else 0.0
        below = {t.name for t in rest if rank_for_budget(t.out_features, t.in_features, share) == 0}
        if not below:
            break
        floor |= below
    ranks, dense = {}, {}
    for t in targets:
        total = 1 if t.name in floor else rank_for_budget(t.out_features, t.in_features, share)
        total = min(total, t.out_features, t.in_features)
        if factor_params(t, total) >= t.params:
            dense[t.name] = f"budget share {share:.3g} covers the dense matrix (kept exact)"
        else:
            ranks[t.name] = split_rank(total, config.submatrices)
    return ranks, dense


def _fixed_rank(targets: list[Target], config: CompressionConfig) -> tuple[dict[str, list[int]], dict[str, str]]:
    ranks, dense = {}, {}
    for t in targets:
        total = min(config.rank, t.out_features, t.in_features)
        if factor_params(t, total) >= t.params:
            dense[t.name] = f"rank {total} would not be smaller than the dense matrix"
        else:
            ranks[t.name] = split_rank(total, config.submatrices)
    return ranks, dense
