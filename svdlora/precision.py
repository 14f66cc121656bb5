"""Stage dtypes and the byte budget: which formats each stage uses, and how many ranks its bytes buy.

The budget is a fraction of the targeted matrices' bytes in the model's dtype. Every matrix gets
that fraction of its own bytes (the uniform rule, in bytes; one whose share cannot pay its smallest
plan gets that plan and the others share the rest, as in parameters); a ``full-…`` first stage takes its
fixed cost first, and the low-rank stages split the rest equally in bytes (so an int8 stage gets
about 4x the rank of a float32 one). With every stage in the model's dtype this is the old
parameter budget, which ``allocate.allocate_ranks`` keeps handling.
"""

from __future__ import annotations

import math

import torch

from .allocate import comparable
from .decompose import budget_values
from .errors import BudgetError, SvdloraError
from .quantize import FULL_PREFIX, StageFormat, dtype_name, float_format, nbytes, parse_format, stage_bytes
from .targets import Target


def stage_formats(names: list[str] | None, submatrices: int, model_dtype: torch.dtype) -> list[StageFormat]:
    """One format per stage: the given names, the last one repeated up to ``submatrices``
    (as a low-rank stage: ``full-int8`` repeats as ``int8``)."""
    if not names:
        return [float_format(model_dtype)] * submatrices
    if len(names) > submatrices:
        raise SvdloraError(
            f"{len(names)} stage dtypes ({','.join(names)}) for {submatrices} submatrices: "
            f"pass --submatrices {len(names)} or fewer dtypes"
        )
    formats = [parse_format(n) for n in names]
    last = formats[-1]
    if last.full:  # "full-int8" with 2 submatrices: the repair stage is a low-rank int8 one
        last = parse_format(last.name.removeprefix(FULL_PREFIX))
    return formats + [last] * (submatrices - len(formats))


def held_fraction(names: list[str], submatrices: int, budget: float, dtype: torch.dtype) -> float:
    """About what the factors of a byte ``budget`` hold in memory, as a fraction of the targeted matrices' bytes in
    ``dtype`` (the memory check's estimate before loading): stages are held dequantized in ``dtype``, so a
    ``full-…`` first stage holds the whole matrix, and the low-rank stages' bytes hold ``dtype``'s bits over
    their cheapest stage's bits as many (int8 factors of a float32 model: 4x; at most 2x the matrix, the rank
    being at most the smaller side); beside them each layer keeps its stages as stored, for saving
    (``layer.stored``): the ``budget``'s bytes again. Scales and zero points are counted in the budget."""
    formats = stage_formats(names, submatrices, dtype)
    bits = torch.finfo(dtype).bits
    full = formats[0] if formats[0].full else None
    low = formats[1:] if full else formats
    held = 1.0 if full else 0.0
    if low:
        left = max(budget - (_value_bits(full) / bits if full else 0.0), 0.0)
        held += min(left * bits / min(_value_bits(f) for f in low), 2.0)
    return held + budget


def _value_bits(fmt: StageFormat) -> int:
    return torch.finfo(fmt.dtype).bits if fmt.kind == "float" else 8 if fmt.kind == "int8" else 4


def set_float_storage(line, dtype: torch.dtype) -> None:
    """A factorized report line's stage dtypes and bytes when every factor is stored in ``dtype`` (plain
    float pairs or pivoted factors, no quantized stage): what compress, streaming and a re-save report.
    Both ``stored_bytes`` and ``dense_bytes`` are in the matrix's own dtype (float budgets count values)."""
    from .pivoted import pivoted_bytes  # pivoted builds on the layers, which this module must not import

    out_features, in_features = line.shape
    line.stage_dtypes = [dtype_name(dtype)] * len(line.ranks)
    line.stored_bytes = (
        pivoted_bytes(out_features, in_features, sum(line.ranks), dtype)
        if line.pivoted
        else layer_bytes(line.ranks, stage_formats(None, len(line.ranks), dtype), out_features, in_features)
    )
    line.dense_bytes = out_features * in_features * torch.finfo(dtype).bits // 8


def target_bytes(target: Target, dtype: torch.dtype) -> int:
    """What the dense matrix costs in the model's dtype (the budget's unit)."""
    return target.params * torch.finfo(dtype).bits // 8


def allocate_bytes(
    targets: list[Target], budget: float, formats: list[StageFormat], dtype: torch.dtype
) -> tuple[dict[str, tuple[list[int], list[StageFormat]]], dict[str, str]]:
    """Per target: (stage ranks, stage formats) whose bytes fit ``budget`` x its dense bytes; and
    the targets kept dense (with why). Ranks of 0 are dropped with their format; a full stage has rank 0.

    As ``allocate.allocate_ranks`` does in parameters: a matrix whose share cannot pay its smallest plan
    (its full stage, or rank 1 of the cheapest low-rank stage) gets that plan, and the others share
    the rest. Σ stage bytes <= budget · Σ dense bytes holds exactly, scales and zero points included.
    """
    total = allowed_bytes(budget, sum(target_bytes(t, dtype) for t in targets))
    floor: set[str] = set()  # matrices held at their smallest plan because their share is smaller
    share = budget
    while True:
        rest = [t for t in targets if t.name not in floor]
        if floor:
            left = total - sum(smallest_plan_bytes(t, formats) for t in targets if t.name in floor)
            if left < 0 or (rest and left <= 0):
                names = ",".join(f.name for f in formats)
                raise BudgetError(
                    f"budget {budget} is too small for {names} stages: even the smallest plan of every targeted "
                    "matrix needs more; raise {flag}, choose cheaper stage dtypes or --exclude the smallest layers"
                )
            share = min(1.0, left / sum(target_bytes(t, dtype) for t in rest)) if rest else 0.0
        below = {t.name for t in rest if _share_bytes(t, share, dtype) < smallest_plan_bytes(t, formats)}
        if not below:
            break
        floor |= below
    plans, dense = {}, {}
    for t in targets:
        allowed = smallest_plan_bytes(t, formats) if t.name in floor else _share_bytes(t, share, dtype)
        plan = plan_matrix(t, allowed, formats, f"budget {budget}")
        if layer_bytes(*plan, t.out_features, t.in_features) >= target_bytes(t, dtype):
            dense[t.name] = "the budget covers the dense matrix (kept exact)"
        else:
            plans[t.name] = plan
    return plans, dense


def allowed_bytes(budget: float, dense_bytes: int) -> int:
    """The whole bytes ``budget`` allows of ``dense_bytes`` (``decompose.budget_values``' relative slack: an
    absolute 1e-6 lost the last byte of 0.568 x 55,640,146,500 to round-off)."""
    return math.floor(budget_values(budget, dense_bytes))


def _share_bytes(t: Target, share: float, dtype: torch.dtype) -> int:
    return allowed_bytes(share, target_bytes(t, dtype))


def smallest_plan_bytes(t: Target, formats: list[StageFormat]) -> int:
    """Bytes of the cheapest plan ``plan_matrix`` can make for ``t``: its full first stage alone, or
    rank 1 in the cheapest low-rank stage."""
    if formats[0].full:
        return nbytes(formats[0], t.out_features, t.in_features)
    return min(stage_bytes(f, t.out_features, t.in_features, 1) for f in formats)


def plan_matrix(t: Target, allowed: int, formats: list[StageFormat], what: str) -> tuple[list[int], list[StageFormat]]:
    """Stage ranks and formats of one matrix within ``allowed`` bytes: a full first stage is paid
    first, the low-rank stages split the rest equally in bytes, leftovers go to earlier stages."""
    out_f, in_f = t.out_features, t.in_features
    full = formats[0] if formats[0].full else None
    low = formats[1:] if full else formats
    left = allowed - (nbytes(full, out_f, in_f) if full else 0)
    if left < 0:
        raise BudgetError(
            f"{what} is too small for a {full.name} first stage of {t.name!r} "
            f"({nbytes(full, out_f, in_f)} bytes of {allowed} allowed): raise {{flag}} or use another first stage"
        )
    costs = [stage_bytes(f, out_f, in_f, 1) for f in low]
    ranks = [int(left / len(low) // c) for c in costs] if low else []
    cap = min(out_f, in_f)
    spent = sum(r * c for r, c in zip(ranks, costs, strict=True))
    grown = True
    while grown and sum(ranks) < cap:  # spend what the equal split left over, earlier stages first
        grown = False
        for j, c in enumerate(costs):
            if spent + c <= left and sum(ranks) < cap:
                ranks[j] += 1
                spent += c
                grown = True
    while sum(ranks) > cap:  # more rank than the matrix has: trim the last stages
        j = max(i for i, r in enumerate(ranks) if r > 0)
        ranks[j] -= 1
    kept = [(r, f) for r, f in zip(ranks, low, strict=True) if r > 0]
    if not kept and not full:
        raise BudgetError(
            f"{what} is too small for {t.name!r}: even rank 1 in {low[0].name} needs "
            f"{costs[0]} bytes of {allowed}; raise {{flag}} or --exclude it"
        )
    return ([0] if full else []) + [r for r, _ in kept], ([full] if full else []) + [f for _, f in kept]


def layer_bytes(ranks: list[int], formats: list[StageFormat], out_features: int, in_features: int) -> int:
    """Stored bytes of one factorized matrix (bias not included)."""
    return sum(
        nbytes(f, out_features, in_features) if f.full else stage_bytes(f, out_features, in_features, r)
        for r, f in zip(ranks, formats, strict=True)
    )


def allocate_bytes_global(
    targets: list[Target],
    spectra: dict[str, torch.Tensor],
    budget: float,
    formats: list[StageFormat],
    dtype: torch.dtype,
    allowed: int | None = None,
) -> tuple[dict[str, tuple[list[int], list[StageFormat]]], dict[str, str], dict[str, float]]:
    """Stage plans chosen together: greedy on the loss each byte buys, under the same exact byte budget
    (or within ``allowed`` bytes, what the run's budget left these matrices: ``allocate_bytes_comparable``).

    ``spectra[name]`` holds the weighted singular values of what the low-rank stages factorize (W, or
    W minus its full first stage), descending; one more unit of total rank of matrix t removes
    σ²_{R+1} and costs u_t bytes, u_t = n / Σ_j 1/c_j for the equal-bytes split over stages of
    per-rank cost c_j. Each matrix then gets ``plan_matrix`` of its full stage plus u_t·R_t bytes,
    and Σ of those is what the greedy kept within budget · Σ dense bytes. As in
    ``allocate.allocate_global``, a rank is only given while its bytes stay below the dense matrix's,
    and keeping a matrix dense (exact) is a move of its own (gain: the whole tail; cost: the dense
    bytes beyond its current plan). Returns the plans, the matrices kept dense (with why) and each
    factorized matrix's estimated loss left (Σ of the dropped σ²).
    """
    import heapq

    if allowed is None:
        allowed = allowed_bytes(budget, sum(target_bytes(t, dtype) for t in targets))
    full = formats[0] if formats[0].full else None
    low = formats[1:] if full else formats
    fixed, unit, tails, rank, dense_cost = {}, {}, {}, {}, {}
    for t in targets:
        fixed[t.name] = nbytes(full, t.out_features, t.in_features) if full else 0
        costs = [stage_bytes(f, t.out_features, t.in_features, 1) for f in low]
        unit[t.name] = len(low) / sum(1 / c for c in costs) if low else math.inf
        squares = spectra[t.name].double().square()
        tails[t.name] = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]).tolist()
        rank[t.name] = 0 if full else 1
        dense_cost[t.name] = target_bytes(t, dtype)

    def cost(name: str, k: int) -> int:
        # no low-rank stage (a full stage only): rank stays 0 and costs nothing (inf · 0 would be NaN)
        return fixed[name] + (math.ceil(unit[name] * k) if low else 0)

    spent = sum(cost(t.name, rank[t.name]) for t in targets)
    if spent > allowed:
        raise BudgetError(
            f"budget {budget} is too small for {','.join(f.name for f in formats)} stages on every targeted "
            "matrix: raise {flag}, choose cheaper stage dtypes or --exclude the smallest layers"
        )
    heap: list[tuple[float, int, str, str]] = []
    version = {t.name: 0 for t in targets}
    by_name = {t.name: t for t in targets}
    dense: dict[str, str] = {}

    def push(name: str) -> None:
        k, tail, t = rank[name], tails[name], by_name[name]
        if low and k < min(t.out_features, t.in_features, len(tail) - 1) and cost(name, k + 1) < dense_cost[name]:
            heapq.heappush(heap, (-(tail[k] - tail[k + 1]) / unit[name], version[name], name, "rank"))
        if tail[k] > 0:
            extra = max(dense_cost[name] - cost(name, k), 1)
            heapq.heappush(heap, (-tail[k] / extra, version[name], name, "dense"))

    for t in targets:
        push(t.name)
    while heap:
        _, ver, name, move = heapq.heappop(heap)
        if ver != version[name] or name in dense:
            continue
        k = rank[name]
        extra = (cost(name, k + 1) if move == "rank" else dense_cost[name]) - cost(name, k)
        if spent + extra > allowed:
            continue  # does not fit; a cheaper matrix's next rank still may
        spent += extra
        version[name] += 1
        if move == "dense":
            dense[name] = "global allocation: kept dense (its loss per byte beats any rank it could get)"
        else:
            rank[name] += 1
            push(name)
    plans, loss_left = {}, {}
    for t in targets:
        if t.name not in dense:
            plans[t.name] = plan_matrix(t, cost(t.name, rank[t.name]), formats, f"the global share of budget {budget}")
            # at the rank stored: stages of unequal cost per rank (float32 + int4) spend what the bytes of the
            # greedy's rank leave over on more rank of the cheaper stage
            stored = sum(plans[t.name][0])
            loss_left[t.name] = tails[t.name][min(stored, len(tails[t.name]) - 1)]
    return plans, dense, loss_left


def allocate_bytes_comparable(
    targets: list[Target],
    spectra: dict[str, torch.Tensor],
    units: dict[str, str],
    budget: float,
    formats: list[StageFormat],
    dtype: torch.dtype,
) -> tuple[dict[str, tuple[list[int], list[StageFormat]]], dict[str, str], dict[str, float]]:
    """``allocate_bytes_global`` over the matrices whose spectra are in the most complete units present
    (``allocate.comparable``); the others (a pooler the loss does not reach, an expert that never ran) get
    the plan ``allocate_bytes`` gives them at this budget, and the greedy spends the bytes left. Ranked with
    the loss-weighted ones, their σ(W·S) or σ(W) looked far larger: they took every rank and starved the rest
    (``allocate.allocate_comparable`` in parameters). No loss estimate for those (it would be in other units)."""
    together, apart = comparable(targets, units)
    if not apart:
        return allocate_bytes_global(targets, spectra, budget, formats, dtype)
    uniform_plans, uniform_dense = allocate_bytes(targets, budget, formats, dtype)
    plans = {t.name: uniform_plans[t.name] for t in apart if t.name in uniform_plans}
    dense = {t.name: uniform_dense[t.name] for t in apart if t.name in uniform_dense}
    stored = sum(layer_bytes(*plans[t.name], t.out_features, t.in_features) for t in apart if t.name in plans)
    stored += sum(target_bytes(t, dtype) for t in apart if t.name in dense)
    left = allowed_bytes(budget, sum(target_bytes(t, dtype) for t in targets)) - stored
    global_plans, global_dense, est_loss = allocate_bytes_global(together, spectra, budget, formats, dtype, left)
    return plans | global_plans, dense | global_dense, est_loss


def allocate_stages(
    targets: list[Target],
    config,
    dtype: torch.dtype,
    weighting_for=None,
    allocation: str = "uniform",
    progress: bool = False,
) -> tuple[dict[str, tuple[list[int], list[StageFormat]]], dict[str, str], dict[str, float]]:
    """Plans for ``config.stage_dtypes``: uniform bytes, or global over the weighted spectra of what
    the low-rank stages will factorize (``weighting_for(name)`` gives a matrix's weighting)."""
    formats = stage_formats(config.stage_dtypes, config.submatrices, dtype)
    if allocation != "global" or weighting_for is None:
        plans, dense = allocate_bytes(targets, config.budget, formats, dtype)
        return plans, dense, {}
    from tqdm.auto import tqdm

    from .layers import weight_out_in
    from .methods import spectrum_units, weighted_spectrum
    from .quantize import roundtrip

    spectra, units = {}, {}
    for t in tqdm(targets, desc="spectra", disable=not progress):
        weight = weight_out_in(t.module).detach().float()
        if formats[0].full:  # the low-rank stages see the full stage's rounding error
            weight = weight - roundtrip(weight, formats[0])
        weighting = weighting_for(t.name)
        spectra[t.name] = weighted_spectrum(weight, weighting)
        units[t.name] = spectrum_units(weighting)
    return allocate_bytes_comparable(targets, spectra, units, config.budget, formats, dtype)
