"""One compression sweep, shared by every table: load the dense model once, then for each setting
copy it, ``svdlora.compress`` the copy and ``svdlora.evaluate`` it in memory.

Each setting's row is written to a JSON cache as soon as it is measured, so a rerun (or a run
cut short) only measures what is missing. The cache is dropped when the model's weights or the
evaluation settings change.

Example:
    >>> evals = {"test": Eval("image-classification", "cifar10/test", {"limit": 2000})}
    >>> sweep = run_sweep("vit-folder", evals, table1() + table2(), Path("cache/vit.json"))
    >>> sweep["dense"]["evals"]["test"]["metrics"]["accuracy"]
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from svdlora import compress, evaluate
from svdlora.compress import count_parameters
from svdlora.models import WEIGHT_SUFFIXES, load_model

logger = logging.getLogger(__name__)

SUBMATRICES = tuple(range(1, 10))
BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# What one evaluation keeps of svdlora.evaluate's MODEL entry.
EVAL_KEYS = ("metrics", "examples", "wall_time_s", "model_time_s", "throughput", "throughput_unit",
             "model_memory_bytes", "peak_memory_bytes")  # fmt: skip


@dataclass(frozen=True)
class Setting:
    budget: float
    submatrices: int
    svd_method: str = "exact"

    @property
    def key(self) -> str:
        return f"budget={self.budget:g} submatrices={self.submatrices} svd={self.svd_method}"


@dataclass
class Eval:
    """One ``svdlora.evaluate`` call: task, data and its keyword options (limit, num_beams, ...)."""

    task: str
    data: str | Path
    options: dict = field(default_factory=dict)


def table1(budget: float = 0.5, submatrices: Iterable[int] = SUBMATRICES,
           methods: Iterable[str] = ("exact", "randomized")) -> list[Setting]:  # fmt: skip
    """Submatrices 1..9 at a fixed budget, for each SVD method."""
    return [Setting(budget, n, m) for m in methods for n in submatrices]


def table2(budgets: Iterable[float] = BUDGETS, submatrices: int = 3) -> list[Setting]:
    """Budgets 0.1..1.0 at a fixed number of submatrices, exact SVD."""
    return [Setting(b, submatrices) for b in budgets]


def load_dense(model: str | Path, task: str):
    from svdlora.evaluation.loading import load_processor

    return load_model(str(model), device="cpu", dtype="float32").eval(), load_processor(str(model), task)


def _fingerprint(model: str | Path, evals: dict[str, Eval]) -> dict:
    path = Path(model)
    weights = sorted(
        (f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in path.glob("*") if f.suffix in WEIGHT_SUFFIXES
    ) if path.is_dir() else []  # fmt: skip
    return json.loads(json.dumps({
        "model": str(model), "weights": weights,
        "evals": {k: {"task": e.task, "data": str(e.data), "options": e.options} for k, e in evals.items()},
    }, default=str))  # fmt: skip


def _measure(model, processor, evals: dict[str, Eval]) -> dict:
    out = {}
    for name, e in evals.items():
        result = evaluate((model, processor), e.task, e.data, progress=False, **e.options)
        out[name] = {k: result["model"][k] for k in EVAL_KEYS}
        out[name]["settings"] = result["settings"]
    return out


def run_sweep(
    model: str | Path, evals: dict[str, Eval], settings: list[Setting], cache_file: Path, force: bool = False
) -> dict:
    """Measure the dense model and every setting; rows come back in the order of ``settings``.

    Args:
        model: a dense model folder (``save_pretrained``) or hub id.
        evals: named evaluations run on the dense model and on every compressed one.
        settings: what to compress with; duplicates are measured once.
        cache_file: JSON file of finished rows (read, then rewritten after every setting).
        force: ignore the cache.
    Returns:
        ``{"model", "dense": row, "rows": [row, ...], "wall_s", "measured_s"}`` (``measured_s``: time
        spent measuring these rows, in whichever runs measured them); a row holds the setting, parameter
        counts, layer counts, relative Frobenius errors, compress time, and per evaluation the
        metrics, wall / model time, throughput and memory.
    """
    cache_file = Path(cache_file)
    fingerprint = _fingerprint(model, evals)
    cache = {"fingerprint": fingerprint, "rows": {}}
    if cache_file.is_file() and not force:
        stored = json.loads(cache_file.read_text())
        if stored.get("fingerprint") == fingerprint:
            cache = stored
        else:
            logger.info("%s was made for other weights or settings: measuring again", cache_file)
    rows = cache["rows"]
    todo = [s for s in dict.fromkeys(settings) if s.key not in rows]
    start = time.perf_counter()
    if "dense" not in rows or todo:
        dense, processor = load_dense(model, next(iter(evals.values())).task)
        params = count_parameters(dense)
    if "dense" not in rows:
        logger.info("dense %s", model)
        t0 = time.perf_counter()
        rows["dense"] = {"setting": None, "parameters": params, "evals": _measure(dense, processor, evals)}
        rows["dense"]["row_wall_s"] = time.perf_counter() - t0
        _save(cache_file, cache)
    for i, s in enumerate(todo):
        logger.info("[%d/%d] %s", i + 1, len(todo), s.key)
        t0 = time.perf_counter()
        work = copy.deepcopy(dense)
        report = compress(work, budget=s.budget, submatrices=s.submatrices, svd_method=s.svd_method, progress=False)
        fac = report.factorized
        errors = [m.rel_error for m in fac]
        rows[s.key] = {
            "setting": asdict(s),
            "parameters": report.model_params_after,
            "parameters_before": report.model_params_before,
            "factorized_layers": len(fac),
            "dense_layers": len(report.modules) - len(fac),
            "factorized_params_before": sum(m.params_before for m in fac),
            "factorized_params_after": sum(m.params_after for m in fac),
            "stage_ranks_first_layer": fac[0].ranks if fac else [],
            "rel_error_mean": sum(errors) / len(errors) if errors else 0.0,
            "rel_error_max": max(errors, default=0.0),
            "compress_s": report.seconds,
            "evals": _measure(work, processor, evals),
        }
        rows[s.key]["row_wall_s"] = time.perf_counter() - t0  # copy + compress + every evaluation
        del work
        _save(cache_file, cache)
    return {
        "model": str(model),
        "dense": rows["dense"],
        "rows": [rows[s.key] for s in settings],
        "wall_s": time.perf_counter() - start,  # this run only: cached rows cost nothing
        "measured_s": sum(rows[k]["row_wall_s"] for k in {"dense", *(s.key for s in settings)}),
    }


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------- reading rows
def metric(name: str, eval_name: str = "test") -> Callable[[dict], float]:
    """A getter for one metric of one evaluation of a row."""
    return lambda row: row["evals"][eval_name]["metrics"][name]


def select(rows: list[dict], **setting) -> list[dict]:
    """Rows whose setting has the given fields, e.g. ``select(rows, svd_method="exact", budget=0.5)``."""
    return [r for r in rows if r["setting"] and all(r["setting"][k] == v for k, v in setting.items())]


def markdown_table(headers: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def plot_metric(ax, rows: list[dict], x: str, value: Callable[[dict], float], dense: float | None,
                ylabel: str, logy: bool = False) -> None:  # fmt: skip
    """``value`` against ``x`` ("budget" or "submatrices"), one line per SVD method, dense as a line."""
    for method in dict.fromkeys(r["setting"]["svd_method"] for r in rows):
        pts = sorted((r["setting"][x], value(r)) for r in rows if r["setting"]["svd_method"] == method)
        ax.plot(*zip(*pts, strict=True), "o-" if method == "exact" else "s--", label=f"{method} SVD", ms=4)
    if dense is not None:
        ax.axhline(dense, color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel("parameter budget" if x == "budget" else "submatrices (residual stages)")
    if x == "submatrices":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def figure(ncols: int, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    return fig, axes


# ---------------------------------------------------------------- the scripts' shared CLI
def add_args(parser, limit_help: str) -> None:
    """Flags every sweep script takes."""
    from benchmarks.common import DEFAULT_CACHE, DEFAULT_RESULTS

    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="trained models, data caches and sweep caches (default: %(default)s)")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="default: %(default)s")
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny models trained for a few steps, tiny slices, few settings")  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest on a CPU shared with other jobs (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="measure every setting again (ignore the sweep cache)")
    parser.add_argument("--no-train", action="store_true",
                        help="fail instead of training when the trained model is not in --cache-dir")  # fmt: skip
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite <name>.md and .png from <results-dir>/<name>.json")  # fmt: skip


def render_saved(name: str, results_dir: Path, plot: Callable, markdown: Callable) -> dict:
    """Re-render ``<results_dir>/<name>.md`` and ``.png`` from the saved ``<name>.json``, measuring nothing.

    So that a change to the text or to the source figures beside ours does not cost a sweep.
    """
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--render-only needs saved results, but {path} does not exist: run the benchmark first")
    results = json.loads(path.read_text())
    plot(results, results_dir / f"{name}.png")
    (results_dir / f"{name}.md").write_text(markdown(results, f"{name}.png"))
    return results


def model_config(results: dict, build_config: Callable) -> dict:
    """The trained model's ``config.json``; where the model folder is absent (results rendered on another
    checkout), the config its training script builds, which fixes every field the text uses."""
    path = Path(results["model"]) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else build_config().to_dict()


def setup(args) -> None:
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("svdlora", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)


def trained(trainer, args, extra: list[str] | None = None, inputs: dict[str, Path] | None = None) -> tuple[Path, dict]:
    """The trainer's model folder and log: loaded when trained, else trained now (unless --no-train).

    ``inputs`` maps the caller's flags to the data the trainer reads, checked only when it trains (so
    that a missing file names the caller's flag, not the trainer's).
    """
    from benchmarks import training
    from benchmarks.data import require

    folder = Path(args.cache_dir) / (f"{trainer.NAME}-quick" if args.quick else trainer.NAME)
    log = training.finished_log(folder)
    if log is None:
        if args.no_train:
            raise SystemExit(f"{folder} holds no finished training: run python -m {trainer.__name__} first")
        require(inputs or {})
        argv = ["--cache-dir", str(args.cache_dir), "--threads", str(args.threads), "--no-progress", *(extra or [])]
        trainer.main(argv + (["--quick"] if args.quick else []))
        setup(args)  # the trainer's setup changed the thread count and logging
        log = training.finished_log(folder)  # as written, with the machine description
    return folder, log


def command(module: str, argv: list[str] | None) -> str:
    import sys

    return f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def machine_line(machine: dict) -> str:
    return (f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs shared with other jobs, "
            f"torch {machine['torch']} ({machine['torch_threads']} thread), {machine['device']}; "
            f"date {machine['date']}.")  # fmt: skip


def compression_cells(row: dict) -> list[str]:
    """Model parameters, factorized/total targeted layers, mean relative Frobenius error."""
    if row["setting"] is None:
        return [f"{row['parameters']:,}", "dense", "0"]
    layers = f"{row['factorized_layers']}/{row['factorized_layers'] + row['dense_layers']}"
    return [f"{row['parameters']:,}", layers, f"{row['rel_error_mean']:.4f}"]


EXACT_SVD_NOTE = (
    "With exact SVD, n residual stages of rank r equal one truncated SVD of rank n·r (Eckart–Young): "
    "at a fixed budget the total rank per matrix, floor(b·mn/(m+n)), is the same for every n and only its "
    "split over the stages changes, so exact SVD predicts identical rows up to float round-off; "
    'only randomized SVD (`svd_method="randomized"`, each stage a fresh sketch of the residual) can differ.'
)


def table1_summary(rows: list[dict], value: Callable[[dict], float], what: str, digits: int = 4) -> str:
    """One paragraph on what Table 1 measured: spread per SVD method, and the timing noise."""

    def span(xs: list[float], d: int = digits) -> str:
        return f"{min(xs):.{d}f}–{max(xs):.{d}f}"

    exact, rand = select(rows, svd_method="exact"), select(rows, svd_method="randomized")
    text = (f"Measured: with exact SVD, {what} spans {span([value(r) for r in exact])} over {len(exact)} values of n "
            f"(mean relative error {span([r['rel_error_mean'] for r in exact], 4)})")  # fmt: skip
    if rand:
        by_n = {r["setting"]["submatrices"]: value(r) for r in exact}
        below = sum(value(r) < by_n.get(r["setting"]["submatrices"], float("-inf")) for r in rand)
        text += (f"; with randomized SVD, {span([value(r) for r in rand])} (mean relative error "
                 f"{span([r['rel_error_mean'] for r in rand], 4)}), lower than exact at {below} of {len(rand)} values "
                 "of n")  # fmt: skip
    return text + (
        ". The cost per example does not depend on n: the stages are concatenated, two matmuls per layer whatever n is"
    )


def runtime_note(same_cost: list[dict], unit: str) -> str:
    """How far apart the model times of rows with identical cost are: the timing noise of this run."""
    times = [r["evals"][next(iter(r["evals"]))]["model_time_s"] for r in same_cost]
    spread = max(times) / min(times)
    text = (
        f"Runtimes: model time is the time inside the model's forward / generate calls, and {unit} is counted "
        "over it; one thread, on a 2-core machine that other jobs may share. Rows of identical cost (the "
        f"exact-SVD submatrices rows) differ by up to {spread - 1:.0%}"
    )
    if spread <= 1.25:
        return text + ", so larger runtime differences between rows are real."
    return text + ": other jobs competed for the cores while these ran, so read the runtimes as rough."
