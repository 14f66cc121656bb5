"""Which budget to pick: compress at several budgets, evaluate each, and bisect for a quality target.

``sweep`` measures the dense model once, then each budget (a fresh copy compressed in memory,
evaluated by ``svdlora.evaluate``'s code on the same data and settings). ``find_budget`` bisects
on the budget for the smallest one that meets a target such as ``ppl<=1.5x`` (perplexity at most
1.5 times the dense one) or ``acc-drop<=0.02`` (accuracy at most 2 points below dense); it assumes
quality does not get worse as the budget grows, and says so when the sweep shows otherwise.

The evaluation is a function ``measure(budget) -> Point`` (``budget=None``: the dense model), so
tests and other callers can inject their own.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .errors import BudgetError, SvdloraError, first_line
from .evaluation.options import IMAGES, TEXT, TRANSLATION

logger = logging.getLogger(__name__)

# The quality figure per task, and whether larger is better.
QUALITY = {TEXT: ("perplexity", False), IMAGES: ("accuracy", True), TRANSLATION: ("bleu", True)}
_ALIASES = {"ppl": "perplexity", "perplexity": "perplexity", "acc": "accuracy", "accuracy": "accuracy", "bleu": "bleu"}


@dataclass
class Point:
    budget: float | None  # None: the dense model
    quality: float
    params: int
    bytes_estimate: int  # parameters x bytes per element of their dtype
    result: dict = field(default_factory=dict)  # the full evaluate() dict, when there is one


@dataclass(frozen=True)
class QualityTarget:
    """``metric`` compared with the dense value, as a ratio (``ppl<=1.5x``) or an absolute drop (``acc-drop<=0.02``)."""

    text: str
    metric: str
    kind: str  # "ratio" or "drop"
    limit: float

    def met(self, value: float, dense: float, higher_is_better: bool) -> bool:
        if self.kind == "ratio":
            ratio = value / dense if dense else float("inf")
            return ratio >= self.limit if higher_is_better else ratio <= self.limit
        drop = dense - value if higher_is_better else value - dense
        return drop <= self.limit


def parse_target(text: str, task: str) -> QualityTarget:
    """``ppl<=1.5x`` / ``acc>=0.95x`` (ratio to dense) or ``acc-drop<=0.02`` / ``bleu-drop<=1`` (absolute)."""
    number = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"  # one that float() reads: '1.5.2' or '.' is a malformed target
    match = re.fullmatch(rf"\s*([a-z]+)(-drop)?\s*(<=|>=)\s*({number})\s*(x?)\s*", text.lower())
    metric = _ALIASES.get(match.group(1)) if match else None
    if match is None or metric is None:
        raise SvdloraError(
            f"--target {text!r}: expected e.g. 'ppl<=1.5x' (ratio to the dense model) or 'acc-drop<=0.02' "
            "(absolute drop); metrics: ppl, acc, bleu"
        )
    expected, higher_is_better = QUALITY[task]
    if metric != expected:
        raise SvdloraError(f"--target {text!r}: task {task} is measured by {expected}, not {metric}")
    drop, op, value, ratio = match.group(2), match.group(3), float(match.group(4)), match.group(5)
    if drop and (ratio or op != "<="):
        raise SvdloraError(
            f"--target {text!r}: a drop is absolute and bounded above, e.g. '{match.group(1)}-drop<=0.02'"
        )
    if not drop and not ratio:
        raise SvdloraError(f"--target {text!r}: say 'x' for a ratio to the dense model, e.g. 'ppl<=1.5x'")
    if not drop and op != ("<=" if not higher_is_better else ">="):
        raise SvdloraError(
            f"--target {text!r}: {expected} should be bounded {'below' if higher_is_better else 'above'}"
        )
    return QualityTarget(text, metric, "drop" if drop else "ratio", value)


def measured_budget(budget: float) -> float:
    """A budget as the sweep measures and records it: to 6 decimals, so the bisection's points and the listed
    budgets meet (and a bisection stops where its midpoint rounds onto a bound)."""
    return round(budget, 6)


def find_budget(
    measure: Callable[[float], Point],
    meets: Callable[[Point], bool],
    low: float = 0.02,
    high: float = 1.0,
    tolerance: float = 0.02,
    known: dict[float, Point] | None = None,
) -> tuple[float | None, dict[float, Point | None]]:
    """Smallest budget in [low, high] (to ``tolerance``) whose point meets the target, by bisection.

    Points already measured (``known``, e.g. the sweep's) narrow the bracket first. Returns
    ``(budget or None when even ``high`` fails, every point measured)``; a budget the model cannot be
    compressed at (``BudgetError``) counts as failing and is kept as ``None``.
    """
    if not tolerance > 0:  # also NaN
        raise SvdloraError(f"tolerance must be > 0, got {tolerance!r}")
    points: dict[float, Point | None] = dict(known or {})  # None: the budget is too small to compress at

    def at(budget: float) -> Point | None:
        budget = measured_budget(budget)
        if budget not in points:
            try:
                points[budget] = measure(budget)
            except BudgetError as err:
                logger.info("budget %s cannot be measured (%s): counted as failing", budget, err)
                points[budget] = None
        return points[budget]

    def ok(point: Point | None) -> bool:
        return point is not None and meets(point)

    # a known point below ``low`` that meets the target (a listed budget under 0.02) is the answer's upper
    # bound: the search must reach down to it, not return ``low`` above a budget shown to meet the target
    low = min([low, *(b for b, p in points.items() if b <= high and ok(p))])
    passing = sorted(b for b, p in points.items() if low <= b <= high and ok(p))
    hi = passing[0] if passing else high
    if not ok(at(hi)):
        return None, points
    failing = [b for b, p in points.items() if low <= b < hi and not ok(p)]
    lo = max(failing) if failing else low
    if lo == low and ok(at(low)):
        return low, points
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if measured_budget(mid) in (measured_budget(lo), measured_budget(hi)):
            break
        if ok(at(mid)):
            hi = mid
        else:
            lo = mid
    return measured_budget(hi), points


def evaluating_measure(
    model: nn.Module,
    processor: Any,
    task: str,
    data: Any,
    compress_options: dict,
    eval_options: dict,
    data_read: Any = None,
):
    """The default ``measure``: compress a copy of ``model`` at the budget and evaluate it in memory;
    ``data_read``: ``data`` as ``evaluation.read_data`` read it, once for every point (None: read by each).
    The calibration (``shared_calibration``) is run at the first budget, once for every budget, unless
    ``compress_options`` hold its ``statistics`` already or no ``calibration``."""
    from .compress import compress, count_parameters
    from .evaluation import evaluate

    metric, _ = QUALITY[task]
    options = compress_options  # replaced by the shared calibration's at the first budget

    def measure(budget: float | None) -> Point:
        nonlocal options
        candidate = model if budget is None else copy.deepcopy(model)
        if budget is not None:
            if "statistics" not in options and options.get("calibration") is not None:
                # at the first budget (a failure is that budget's, as it was); without data there is none to share
                options, _ = shared_calibration(model, options)
            compress(candidate, budget=budget, progress=False, **options)
        result = evaluate((candidate, processor), task=task, data=data, data_read=data_read, **eval_options)
        params = count_parameters(candidate)
        element = next(candidate.parameters()).element_size()
        logger.info("budget %s: %s %.4g", budget, metric, result["model"]["metrics"][metric])
        return Point(budget, float(result["model"]["metrics"][metric]), params, params * element, result)

    return measure


def shared_calibration(model: nn.Module, compress_options: dict, progress: bool = False) -> tuple[dict, str | None]:
    """``compress_options`` with their calibration data read into batches and its statistics collected on the
    dense ``model`` (which keep the layers' weightings once computed: ``plan.Statistics``), once for every
    budget (none depends on it), and how a report names that data (None:
    no data, or none these options read). A model compressed with them must be a copy of the dense ``model``."""
    from .compress import calibration_plan

    plan = calibration_plan(model, progress=progress, **compress_options)
    if plan.source is None:  # nothing read: compress reads nothing either (and says so)
        return {**compress_options, "statistics": None}, None
    return {**compress_options, "calibration": plan.batches, "statistics": plan.stats}, plan.source


class SweepStopped(Exception):
    """A measurement failed for a reason other than its budget (out of memory, a bug): ``record`` is the
    sweep's record of the points measured before (``record["failed"]`` says at which budget, and why),
    ``error`` the failure itself, for the caller to raise once the record is kept."""

    def __init__(self, record: dict, error: Exception) -> None:
        super().__init__(f"the sweep stopped at budget {record['failed']['budget']}: {record['failed']['error']}")
        self.record, self.error = record, error


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a budget's measurement: still a KeyboardInterrupt (callers' ``except Exception`` let it by),
    holding the record of the points measured before (``record["failed"]`` says at which budget)."""

    def __init__(self, record: dict) -> None:
        super().__init__(f"the sweep was interrupted at budget {record['failed']['budget']}")
        self.record = record


class _Stop(Exception):  # a measurement's failure, carried past find_budget (which catches BudgetError only)
    def __init__(self, budget: float, error: Exception) -> None:
        super().__init__(budget)
        self.budget, self.error = budget, error


def sweep(
    measure: Callable[[float | None], Point],
    budgets: list[float],
    task: str,
    target: QualityTarget | None = None,
    tolerance: float = 0.02,
) -> dict:
    """Dense point, one point per budget, and (with ``target``) the smallest budget that meets it.

    A budget the model cannot be compressed at (``BudgetError``: too small) is skipped and noted; any other
    failure (another SvdloraError too: bad calibration data, a refused setting, which every budget would
    meet) stops the sweep with ``SweepStopped``, which holds the points measured before it
    (an interruption: ``SweepInterrupted``, a KeyboardInterrupt, likewise).
    """
    metric, higher_is_better = QUALITY[task]
    dense = measure(None)  # nothing is measured before it: its failure is the sweep's, as it is
    measured: dict[float, Point] = {}

    current: list[float] = []  # the budget being measured, for an interruption

    def guarded(budget: float) -> Point:
        current[:] = [budget]
        try:
            point = measure(budget)
        except BudgetError:
            raise  # the budget's own problem: skipped, or counted as failing by find_budget
        except Exception as err:  # noqa: BLE001  re-raised by the caller with the points measured before
            raise _Stop(budget, err) from err
        measured[budget] = point
        return point

    record: dict = {"task": task, "metric": metric, "higher_is_better": higher_is_better, "dense": asdict(dense)}
    skipped: dict[str, str] = {}  # a budget too small to compress at: the others are still measured
    record["skipped"] = skipped
    if target is not None:
        record["target"] = {"text": target.text, "budget": None, "tolerance": tolerance}
    points: dict[float, Point | None] = {}
    try:
        # as find_budget measures them: a listed 0.1234567 was measured again there as 0.123457
        for budget in sorted({measured_budget(b) for b in budgets}):
            try:
                points[budget] = guarded(budget)
            except BudgetError as err:
                said = str(err.for_flag("--budgets"))  # the fix names the sweep's option, not compress's
                logger.warning("budget %s not measured: %s", budget, said)
                points[budget], skipped[str(budget)] = None, said  # find_budget counts it as failing
        if skipped and target is None and len(skipped) == len(points):
            raise SvdloraError(
                f"no budget in --budgets could be measured ({next(iter(skipped.values()))}): list larger ones"
            )
        if target is not None:
            chosen, points = find_budget(
                guarded, lambda p: target.met(p.quality, dense.quality, higher_is_better),
                tolerance=tolerance, known=points,
            )  # fmt: skip
            record["target"]["budget"] = chosen
        # over every point the record lists, the bisection's too: they may show a dip the listed ones do not
        _note_monotone(record, points)
    except _Stop as stop:
        _add_points(record, measured)
        record["failed"] = {"budget": stop.budget, "error": f"{type(stop.error).__name__}: {first_line(stop.error)}"}
        raise SweepStopped(record, stop.error) from stop.error
    except KeyboardInterrupt:
        _add_points(record, measured)
        record["failed"] = {"budget": current[0] if current else None, "error": "interrupted"}
        raise SweepInterrupted(record) from None
    record["points"] = _measured(points)
    return record


def _measured(points: dict[float, Point | None]) -> list[dict]:
    return [asdict(points[b]) for b in sorted(points) if points[b] is not None]


def _note_monotone(record: dict, points: dict[float, Point | None]) -> None:
    """Whether quality is monotone in the budget over the measured points (a warning when not)."""
    qualities = [points[b].quality for b in sorted(points) if points[b] is not None]
    order = sorted(qualities) if record["higher_is_better"] else sorted(qualities, reverse=True)
    record["monotone"] = qualities == order
    if not record["monotone"]:
        logger.warning("quality is not monotone in the budget over %s: bisection may miss", sorted(points))


def _add_points(record: dict, points: dict[float, Point | None]) -> None:
    """The points measured before a failure, and whether they are monotone."""
    _note_monotone(record, points)
    record["points"] = _measured(points)
