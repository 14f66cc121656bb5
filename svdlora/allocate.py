"""Rank allocation: how many singular triplets each targeted matrix gets.

``uniform`` gives every matrix the same fraction of its own parameters (the sources' rule),
re-balancing when some matrices must stay dense. ``global`` chooses all ranks together from
what truncating each matrix costs (its weighted spectrum), under the same hard budget, and
may keep a sensitive matrix dense.
"""

from __future__ import annotations

import heapq
import logging
import math

import torch

from .config import CompressionConfig
from .decompose import budget_values, split_rank
from .errors import BudgetError
from .methods import SPECTRUM_UNITS
from .targets import Target, factor_params, rank_for_share

logger = logging.getLogger(__name__)

# why a layer's spectrum is in other units than the allocation's (``methods.spectrum_units``)
_APART = {
    # all-zero gradients (said here only) or not finite ones (also said per layer, ``weighting.output_weights``)
    "W·S": (
        "without usable gradient statistics (the loss does not reach them, or its gradients there are not finite: "
        "{}), so no output weighting by the loss"
    ),
    "D·W": "without usable input statistics ({})",
    "W": "that never ran on the calibration data ({})",
}


def allocate_ranks(targets: list[Target], config: CompressionConfig) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per-module stage ranks, and the targets that stay dense (with the reason).

    Budget mode guarantees Σ factor params + Σ dense params <= budget·Σ targeted params (pivoted
    factors with their pivot indices, ``factor_params``; in bytes where the targets share one dtype):
    a matrix whose share would buy factors at least as large as itself stays dense (exact, and
    no dearer); a matrix whose share is below rank 1 gets rank 1, and the others share the rest.
    """
    if config.rank is not None:
        return _fixed_rank(targets, config)
    pivot = config.pivot
    allowed = config.budget * sum(t.params for t in targets)
    floor: set[str] = set()  # matrices held at rank 1 because their share is smaller
    while True:
        rest = [t for t in targets if t.name not in floor]
        left = allowed - sum(factor_params(t, 1, pivot) for t in targets if t.name in floor)
        if left < 0 or (rest and left <= 0):
            raise BudgetError(
                f"budget {config.budget} is too small: even rank 1 for every targeted matrix needs more; "
                "raise {flag} or --exclude the smallest layers"
            )
        share = min(1.0, left / sum(t.params for t in rest)) if rest else 0.0
        below = {t.name for t in rest if rank_for_share(t, share, pivot) == 0}
        if not below:
            break
        floor |= below
    ranks, dense = {}, {}
    for t in targets:
        total = 1 if t.name in floor else rank_for_share(t, share, pivot)
        total = min(total, t.out_features, t.in_features)
        # before rounding: dense if the share covers it. Pivoted, a whole share (budget 1) does too: full rank
        # with its pivot indices is dearer than the matrix, and the rank the share buys would not be exact
        if factor_params(t, total, pivot) >= t.params or (pivot and share >= 1):
            dense[t.name] = f"budget share {share:.3g} covers the dense matrix (kept exact)"
        else:
            ranks[t.name] = split_rank(aligned(total, config.rank_multiple), config.submatrices)
    return ranks, dense


def aligned(rank: int, multiple: int) -> int:
    """``rank`` rounded down to a multiple of ``multiple``; ranks below ``multiple`` are kept."""
    return rank - rank % multiple if rank >= multiple else rank


def _next_rank(rank: int, multiple: int, limit: int) -> int:
    """The next rank the global allocator may give (capped at ``limit``): one more below ``multiple``, as
    ``aligned`` keeps the ranks below it, else the next multiple. Stepping 1 → ``multiple`` left a matrix
    that could not afford (or hold) a rank of ``multiple`` at rank 1 or dense, where uniform gives it more."""
    return min(limit, rank + 1 if rank + 1 < multiple else (rank // multiple + 1) * multiple)


RANK_NOT_SMALLER = "would not be smaller than the dense matrix"  # how a fixed rank's dense reason ends


def _fixed_rank(targets: list[Target], config: CompressionConfig) -> tuple[dict[str, list[int]], dict[str, str]]:
    ranks, dense = {}, {}
    for t in targets:
        total = min(config.rank, t.out_features, t.in_features)
        if factor_params(t, total, config.pivot) >= t.params:
            dense[t.name] = f"rank {total} {RANK_NOT_SMALLER}"
        else:
            ranks[t.name] = split_rank(total, config.submatrices)
    return ranks, dense


def allocate_comparable(
    targets: list[Target], spectra: dict[str, torch.Tensor], units: dict[str, str], config: CompressionConfig
) -> tuple[dict[str, list[int]], dict[str, str], dict[str, float]]:
    """Global allocation over the matrices whose spectra are in the most complete units present
    (``units[name]``: ``methods.spectrum_units``); the others (a pooler the loss does not reach, an expert no
    token was routed to) get their uniform share, as ``allocate_ranks`` gives it at this budget, and the greedy
    spends what is left. Compared with the loss-weighted ones, their σ(W·S) or σ(W) looked far larger (~65x in a
    tiny BERT's pooler): global kept them dense and starved the layers the loss sees. Returns as
    ``allocate_global``; no loss estimate for the uniform ones (it would be in other units)."""
    together, apart = comparable(targets, units)
    if not apart:
        return allocate_global(targets, spectra, config.budget, config.submatrices, config.pivot, config.rank_multiple)
    uniform_ranks, uniform_dense = allocate_ranks(targets, config)
    ranks = {t.name: uniform_ranks[t.name] for t in apart if t.name in uniform_ranks}
    dense = {t.name: uniform_dense[t.name] for t in apart if t.name in uniform_dense}
    stored = sum(factor_params(t, sum(ranks[t.name]), config.pivot) for t in apart if t.name in ranks)
    stored += sum(t.params for t in apart if t.name in dense)
    left = config.budget * sum(t.params for t in targets) - stored  # the slack is added once, by allocate_global
    share = left / sum(t.params for t in together)
    global_ranks, global_dense, est_loss = allocate_global(
        together, spectra, share, config.submatrices, config.pivot, config.rank_multiple
    )
    return ranks | global_ranks, dense | global_dense, est_loss


def comparable(targets: list[Target], units: dict[str, str]) -> tuple[list[Target], list[Target]]:
    """The targets whose spectra are in the most complete units present (``units[name]``:
    ``methods.spectrum_units``), and the others, said in one warning when there are any: these get their
    uniform share, in parameters (``allocate_comparable``) or in bytes (``precision.allocate_bytes_comparable``)."""
    reference = next(u for u in SPECTRUM_UNITS if u in units.values())
    together = [t for t in targets if units[t.name] == reference]
    apart = [t for t in targets if units[t.name] != reference]
    if apart:
        _warn_apart(apart, units)
    return together, apart


def _warn_apart(apart: list[Target], units: dict[str, str]) -> None:
    """One warning: how many layers get the uniform share, a few names, and why."""
    parts = []
    for unit, why in _APART.items():
        names = [t.name for t in apart if units[t.name] == unit]
        if names:
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} layer{'s' * (len(names) > 1)} " + why.format(listed))
    logger.warning(
        "%s: they get the uniform share of the budget, the others are allocated globally", " and ".join(parts)
    )


def allocate_global(
    targets: list[Target],
    spectra: dict[str, torch.Tensor],
    budget: float,
    submatrices: int,
    pivot: bool = False,
    multiple: int = 1,
) -> tuple[dict[str, list[int]], dict[str, str], dict[str, float]]:
    """Choose every matrix's rank together: greedy on the loss each parameter buys.

    ``spectra[name]`` holds the weighted singular values σ of that matrix (descending); keeping
    triplet k removes σ_k² from the estimated loss. Every matrix starts at rank 1; then, until
    the budget is spent, the move with the largest gain per parameter is taken: one more rank
    (gain σ_{k+1}², cost out+in), or keeping the matrix dense (gain: the whole tail, cost: what
    the dense matrix costs beyond the current factors). Gains per rank only fall, so with the
    pair's constant cost per rank this greedy is the optimum of the relaxed problem up to one
    step; pivoted factors (``pivot``) cost out+in−2R−1 (and a pivot index) for rank R+1, and the greedy is
    a heuristic.
    With ``multiple`` > 1 a rank move below it adds one, and from it goes to the next multiple (rank
    1 → 2 → ... → 8 → 16 ...): the ranks ``aligned`` gives the uniform allocation.
    Returns stage ranks, the matrices kept dense (with why), and each factorized matrix's estimated
    loss left (Σ of the dropped σ²).
    """
    allowed = budget_values(budget, sum(t.params for t in targets))
    spent = sum(factor_params(t, 1, pivot) for t in targets)
    if spent > allowed:
        raise BudgetError(
            f"budget {budget} is too small: even rank 1 for every targeted matrix needs more; "
            "raise {flag} or --exclude the smallest layers"
        )
    rank = {t.name: 1 for t in targets}
    tails = {}  # tails[name][k] = Σ_{i>=k} σ_i², the loss left at rank k
    for t in targets:
        squares = spectra[t.name].double().square()
        tails[t.name] = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]).tolist()
    dense: dict[str, str] = {}
    heap: list[tuple[float, int, str, str]] = []
    version = {t.name: 0 for t in targets}
    by_name = {t.name: t for t in targets}

    def push(t: Target) -> None:
        k, tail = rank[t.name], tails[t.name]
        limit = min(t.out_features, t.in_features, len(tail) - 1)
        up = _next_rank(k, multiple, limit)
        if k < limit and factor_params(t, up, pivot) < t.params:
            step = factor_params(t, up, pivot) - factor_params(t, k, pivot)
            heapq.heappush(heap, (-(tail[k] - tail[up]) / step, version[t.name], t.name, "rank"))
        extra = t.params - factor_params(t, k, pivot)
        if extra <= 0:  # dense at no extra cost (a 1xN matrix: rank 1 is exact and dearer): first, so what it frees
            heapq.heappush(heap, (-math.inf, version[t.name], t.name, "dense"))  # is there for the other moves
        elif tail[k] > 0:
            heapq.heappush(heap, (-tail[k] / extra, version[t.name], t.name, "dense"))

    for t in targets:
        push(t)
    while heap:
        _, ver, name, move = heapq.heappop(heap)
        if ver != version[name] or name in dense:
            continue
        t = by_name[name]
        k = rank[name]
        cost = t.params - factor_params(t, k, pivot)
        up = _next_rank(k, multiple, min(t.out_features, t.in_features, len(tails[name]) - 1))
        if move == "rank":
            cost = factor_params(t, up, pivot) - factor_params(t, k, pivot)
        if spent + cost > allowed:
            continue  # does not fit; smaller moves of other matrices still may
        spent += cost
        version[name] += 1
        if move == "dense":
            dense[name] = (
                "global allocation: kept dense (its loss per parameter beats any rank it could get)"
                if cost > 0
                else "global allocation: kept dense (its factors would hold as many values as the matrix)"
            )
        else:
            rank[name] = up
            push(t)
    ranks = {n: split_rank(k, submatrices) for n, k in rank.items() if n not in dense}
    est_loss = {n: tails[n][k] for n, k in rank.items() if n not in dense}
    return ranks, dense, est_loss
