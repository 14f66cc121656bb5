"""Section 3: the poster "SVD-LoRA" tables on a ViT trained here on CIFAR-10.

Trains (or loads) the ViT of ``benchmarks.train_vit``, then Table 1: submatrices 1..9 at budget 0.5,
exact and randomized SVD; Table 2: budget 0.1..1.0 at 3 submatrices, exact SVD. Top-1 accuracy and
evaluation runtime with ``svdlora.evaluate`` on the first ``--limit`` test images (default 2,000,
taken round-robin over the classes: 200 per class).

Usage:
    python -m benchmarks.vit_cifar
    python -m benchmarks.vit_cifar --limit 10000     # the whole test set
    python -m benchmarks.vit_cifar --quick           # seconds: a ViT trained for a few steps
    python -m benchmarks.vit_cifar --render-only     # rewrite the .md/.png from the saved results only
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks import sweep, train_vit
from benchmarks.common import machine_info, stopwatch, write_results
from benchmarks.data import DEFAULT_DATA, extract_cifar10
from benchmarks.sweep import Eval, compression_cells, markdown_table

logger = logging.getLogger(__name__)

NAME = "vit_cifar"
TABLE1_BUDGET = 0.5
TABLE2_SUBMATRICES = 3
# The poster's Tables 1 and 2 (../shared/sources/poster-svd-lora.txt), each row as (eval accuracy, eval runtime).
# It fine-tuned a pretrained ViT; it names no budget for Table 1 ("a fixed number of parameters") and no unit or
# hardware for the runtimes. Table 1 is keyed by submatrices, Table 2 by "Parameter %" read as our budget.
POSTER = {
    "baseline": (0.9769, 131.2141),
    "table1": {1: (0.9571, 129.2873), 2: (0.962, 128.7298), 3: (0.9617, 129.0121), 4: (0.9622, 129.2541),
               5: (0.9619, 129.3435), 6: (0.9611, 129.3593), 7: (0.9588, 129.4201), 8: (0.9613, 129.3076),
               9: (0.9612, 130.1609)},
    "table2": {0.1: (0.9617, 130.4624), 0.2: (0.9746, 128.9813), 0.3: (0.9766, 129.0198), 0.4: (0.9763, 129.067),
               0.5: (0.9767, 129.135), 0.6: (0.9767, 129.3274), 0.7: (0.9768, 129.5422), 0.8: (0.9764, 129.5246),
               0.9: (0.9759, 129.4248), 1.0: (0.9759, 129.7098)},
}  # fmt: skip


def settings(quick: bool) -> tuple[list, list]:
    subs, budgets = ((1, 2, 3), (0.1, 0.5, 1.0)) if quick else (sweep.SUBMATRICES, sweep.BUDGETS)
    return sweep.table1(TABLE1_BUDGET, subs), sweep.table2(budgets, TABLE2_SUBMATRICES)


def accuracy(row: dict) -> float:
    return row["evals"]["test"]["metrics"]["accuracy"]


def plot(results: dict, path: Path) -> Path:
    dense = accuracy(results["dense"])
    fig, axes = sweep.figure(3)
    a, b, c = axes[0]
    sweep.plot_metric(a, results["table1"], "submatrices", accuracy, dense, "top-1 accuracy")
    a.set_title(f"Table 1: budget {TABLE1_BUDGET}", fontsize=9)
    sweep.plot_metric(b, results["table2"], "budget", accuracy, dense, "top-1 accuracy")
    b.set_title(f"Table 2: {TABLE2_SUBMATRICES} submatrices, exact SVD", fontsize=9)
    ours = sorted((r["setting"]["budget"], dense - accuracy(r)) for r in results["table2"])
    c.plot(*zip(*ours, strict=True), "o-", ms=4, label="ours (ViT from scratch)")
    theirs = sorted((k, POSTER["baseline"][0] - v[0]) for k, v in POSTER["table2"].items())
    c.plot(*zip(*theirs, strict=True), "s--", ms=5, label="poster (fine-tuned ViT)")
    c.set_xlabel("parameter budget")
    c.set_ylabel("accuracy drop from dense")
    c.set_title("shape: drop from each model's own baseline", fontsize=9)
    c.grid(alpha=0.3)
    c.legend(fontsize=8)
    return sweep.save_figure(fig, path)


NOT_IN_POSTER = "not in the poster"


def _ratio(time: float, base: float) -> str:
    return f"{time / base:.3f}"


def runtime_paragraph(results: dict) -> str:
    """The poster's runtimes beside ours: only ratios to each one's own baseline compare."""
    dense = results["dense"]["evals"]["test"]["model_time_s"]
    ours = [r["evals"]["test"]["model_time_s"] / dense for r in results["table2"]]
    poster = [v[1] / POSTER["baseline"][1] for table in ("table1", "table2") for v in POSTER[table].values()]
    return (
        "Runtimes beside the poster's: the poster's \"Eval Runtime\" comes with no unit and no hardware (its "
        "size fits seconds for its whole evaluation set on a GPU, but the poster does not say so), so its figures "
        'compare with ours only as ratios to each one\'s own baseline: the columns "runtime / dense" (ours, '
        'model time) and "runtime / baseline" (the poster\'s). Every compressed row of the poster, in both '
        f"tables, takes {min(poster):.3f}–{max(poster):.3f} of its baseline's time, whatever the parameter share "
        "(10% is the slowest of its Table 2 rows); ours, in Table 2, take "
        f"{min(ours):.3f}–{max(ours):.3f} of our dense model's time, and fewer parameters take less time."
    )


def markdown(results: dict, png: str) -> str:
    dense_row, t1, t2 = results["dense"], results["table1"], results["table2"]
    dense, n_img, m, log = accuracy(dense_row), results["images"], results["machine"], results["train_log"]
    cfg = sweep.model_config(results, lambda: train_vit.build_config(log.get("quick", False)))
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    base_acc, base_time = POSTER["baseline"]
    dense_time = dense_row["evals"]["test"]["model_time_s"]

    def runtime(row: dict) -> str:
        e = row["evals"]["test"]
        return f"{e['model_time_s']:.2f} s / {e['throughput']:,.0f} img/s"

    def poster_runtime(p: tuple | None) -> list[str]:
        return [str(p[1]), _ratio(p[1], base_time)] if p else [NOT_IN_POSTER, ""]

    body1 = [["dense", f"{dense:.4f}", "", f"{base_acc:.4f}", *compression_cells(dense_row)[:1], "",
              runtime(dense_row), _ratio(dense_time, dense_time), *poster_runtime(POSTER["baseline"])]]  # fmt: skip
    for n in dict.fromkeys(r["setting"]["submatrices"] for r in t1):
        ex = sweep.select(t1, submatrices=n, svd_method="exact")
        rn = sweep.select(t1, submatrices=n, svd_method="randomized")
        p = POSTER["table1"].get(n)
        timed = (ex or rn)[0]
        body1.append([
            n, f"{accuracy(ex[0]):.4f}" if ex else "", f"{accuracy(rn[0]):.4f}" if rn else "",
            f"{p[0]:.4f}" if p else NOT_IN_POSTER,
            f"{timed['parameters']:,}",
            " / ".join(f"{r[0]['rel_error_mean']:.4f}" for r in (ex, rn) if r),
            runtime(timed), _ratio(timed["evals"]["test"]["model_time_s"], dense_time), *poster_runtime(p),
        ])  # fmt: skip
    body2 = [["dense", *compression_cells(dense_row), f"{dense:.4f}", "0", f"{base_acc:.4f}", "0",
              runtime(dense_row), _ratio(dense_time, dense_time), *poster_runtime(POSTER["baseline"])]]  # fmt: skip
    for r in t2:
        b = r["setting"]["budget"]
        p = POSTER["table2"].get(b)
        body2.append(
            [
                f"{b:g}",
                *compression_cells(r),
                f"{accuracy(r):.4f}",
                f"{dense - accuracy(r):+.4f}",
                f"{p[0]:.4f}" if p else NOT_IN_POSTER,
                f"{base_acc - p[0]:+.4f}" if p else "",
                runtime(r),
                _ratio(r["evals"]["test"]["model_time_s"], dense_time),
                *poster_runtime(p),
            ]
        )
    p1 = [v[0] for v in POSTER["table1"].values()]
    lo, hi = (f(POSTER["table1"], key=lambda n: POSTER["table1"][n][0]) for f in (min, max))
    runtime_headers = ["ours: runtime / dense", "poster runtime (unit not stated)", "poster: runtime / baseline"]
    lines = [
        '## ViT / CIFAR-10: the poster "SVD-LoRA" Tables 1 and 2',
        "",
        f"Model: the ViT that `python -m benchmarks.train_vit` trains here from scratch on the 50,000 CIFAR-10 "
        f"training images ({log['parameters']:,} parameters: 32×32 input, patch {cfg['patch_size']}, "
        f"{cfg['num_hidden_layers']} layers, width {h}, {cfg['num_attention_heads']} heads, MLP {i}; the config and "
        f"its reasons are in that file's docstring); {log['epochs_completed']} epochs in "
        f"{log['train_wall_s'] / 60:.0f} min on this machine's CPU; "
        f"its training log gives test accuracy {log['test_accuracy']:.4f} on all {log['test_examples']:,} test "
        f"images. Here every figure is on the first {n_img:,} test images (`--limit {n_img}`, "
        f"{n_img // 10} per class; drop the limit for all 10,000), float32, batch 100, with `svdlora.evaluate`. "
        f"All {max(r['factorized_layers'] for r in t1 + t2)} attention and MLP matrices are targeted; the "
        "classifier head stays dense.",
        "",
        f"Command: `{results['command']}`  ",
        sweep.machine_line(m)
        + f" Time spent measuring these {len({str(r['setting']) for r in t1 + t2})} settings and the dense "
        f"model: {results['measured_s'] / 60:.1f} min.",
        "",
        f"![accuracy against submatrices and budget]({png})",
        "",
        "The poster columns are the poster's Tables 1 and 2 (`../shared/sources/poster-svd-lora.txt`), every "
        "row; the text is rendered from the saved results by "
        f"`python -m benchmarks.{NAME} --render-only`.",
        "",
        sweep.runtime_note(sweep.select(t1, svd_method="exact"), "images/s"),
        "",
        runtime_paragraph(results),
        "",
        f"### Table 1: submatrices at a fixed budget ({TABLE1_BUDGET})",
        "",
        sweep.EXACT_SVD_NOTE + ' The poster\'s Table 1 says only "with a fixed number of parameters", not which; '
        f"we use budget {TABLE1_BUDGET}.",
        "",
        markdown_table(
            [
                "submatrices",
                "ours, exact SVD",
                "ours, randomized SVD",
                "poster",
                "parameters",
                "mean rel. error (exact / randomized)",
                "runtime, exact (model time / speed)",
                *runtime_headers,
            ],
            body1,
        ),  # fmt: skip
        "",
        sweep.table1_summary(t1, accuracy, "the accuracy")
        + f". The poster's rows span {min(p1):.4f} (n = {lo}) to {max(p1):.4f} (n = {hi}), a spread of "
        f"{max(p1) - min(p1):.4f} that cannot come from exact SVD at a fixed total rank; it fits randomized SVD, a "
        "different rank per setting, or run-to-run noise.",
        "",
        f"### Table 2: parameter budget ({TABLE2_SUBMATRICES} submatrices, exact SVD)",
        "",
        markdown_table(
            [
                "budget",
                "parameters",
                "factorized layers",
                "mean rel. error",
                "ours",
                "drop (dense − ours)",
                "poster",
                "drop (baseline − poster)",
                "runtime (model time / speed)",
                *runtime_headers,
            ],
            body2,
        ),  # fmt: skip
        "",
        f"Differences: the poster fine-tuned a pretrained ViT (baseline {base_acc}); ours is a small ViT "
        f"trained from scratch on a CPU (dense {dense:.4f} on these {n_img:,} images), so compare the drop from "
        "each model's own baseline (right panel), not the accuracies. Ours is also far from converged: its "
        f"training stopped on its {log['train_wall_s'] / 60:.0f}-minute budget ({log['stop_reason']}) after "
        f"{log['epochs_completed']} epochs on a CPU shared with other jobs; a longer (GPU) training would change "
        'its spectra and so these drops. We read the poster\'s "Parameter %" as our budget; the poster does not '
        f"define it, and its 100% row scores {base_acc - POSTER['table2'][1.0][0]:.4f} below its baseline, so its "
        "100% is not the dense model either. Budget 1.0 is not lossless here: budget b keeps "
        "total rank floor(b·mn/(m+n)), half the spectrum of a square matrix at b = 1; there the square "
        f"attention matrices stay dense (their factors would be no smaller) and the {i}×{h} MLP matrices keep "
        f"rank {i * h // (i + h)} of {h}. Our runtimes are on a shared 2-core CPU.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python -m benchmarks.vit_cifar --limit 2000")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "cifar10" / "cifar10-jpg.tar.gz",
                        help="cifar10-jpg.tar.gz (default: %(default)s)")  # fmt: skip
    sweep.add_args(parser, "test images evaluated (default: 2000; 50 with --quick)")
    args = parser.parse_args(argv)
    if args.render_only:
        return sweep.render_saved(f"{NAME}_quick" if args.quick else NAME, args.results_dir, plot, markdown)
    sweep.setup(args)
    folder, log = sweep.trained(train_vit, args, ["--data", str(args.data)])
    _, test_dir = extract_cifar10(args.data, args.cache_dir)
    limit = args.limit or (50 if args.quick else 2000)
    evals = {"test": Eval("image-classification", test_dir, {"limit": limit, "batch_size": 100})}
    t1, t2 = settings(args.quick)
    cache = args.cache_dir / "sweeps" / f"{NAME}{'-quick' if args.quick else ''}.json"
    with stopwatch() as wall:
        result = sweep.run_sweep(folder, evals, t1 + t2, cache, force=args.force)
    results = {
        "command": sweep.command(NAME, argv),
        "model": str(folder),
        "train_log": log,
        "images": result["dense"]["evals"]["test"]["examples"],
        "table1_budget": TABLE1_BUDGET,
        "table2_submatrices": TABLE2_SUBMATRICES,
        "dense": result["dense"],
        "table1": result["rows"][: len(t1)],
        "table2": result["rows"][len(t1) :],
        "poster": {k: {str(i): v for i, v in d.items()} if isinstance(d, dict) else d for k, d in POSTER.items()},
        "wall_s": wall(),
        "measured_s": result["measured_s"],
        "machine": machine_info(),
    }
    name = f"{NAME}_quick" if args.quick else NAME
    write_results(name, results, args.results_dir)
    plot(results, args.results_dir / f"{name}.png")
    (args.results_dir / f"{name}.md").write_text(markdown(results, f"{name}.png"))
    return results


if __name__ == "__main__":
    main()
