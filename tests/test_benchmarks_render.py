"""``--render-only``: the benchmark text is rewritten from saved results alone, with the poster beside ours."""

from __future__ import annotations

import json

import pytest

from benchmarks import translation, vit_cifar


def _eval(metrics: dict, time_s: float) -> dict:
    return {"test": {"metrics": metrics, "examples": 20, "model_time_s": time_s, "throughput": 20 / time_s}}


def _row(budget, subs, svd, metrics, time_s, layers=(4, 1)) -> dict:
    return {"setting": {"budget": budget, "submatrices": subs, "svd_method": svd}, "parameters": 1234,
            "factorized_layers": layers[0], "dense_layers": layers[1], "rel_error_mean": 0.5,
            "evals": _eval(metrics, time_s)}  # fmt: skip


def _fake(metrics, model_dir) -> dict:
    machine = {"platform": "test", "cpu_count": 2, "torch": "x", "torch_threads": 1, "device": "cpu", "date": "d"}
    return {
        "command": "fake", "model": str(model_dir), "machine": machine, "measured_s": 60.0,
        "dense": {"setting": None, "parameters": 2000, "evals": _eval(metrics(1.0), 2.0)},
        "table1": [_row(0.5, n, m, metrics(0.9), 1.5) for n in (1, 2) for m in ("exact", "randomized")],
        "table2": [_row(b, 3, "exact", metrics(b), 1.0 + b) for b in (0.1, 0.4, 1.0)],
    }  # fmt: skip


@pytest.mark.parametrize("module", [vit_cifar, translation])
def test_render_only_writes_poster_columns_without_measuring(tmp_path, module):
    # The model folder does not exist: the config comes from the training script, as on a fresh checkout.
    if module is vit_cifar:
        results = _fake(lambda s: {"accuracy": 0.5 * s}, tmp_path / "gone")
        results.update(images=20, train_log={"parameters": 2000, "epochs_completed": 1, "train_wall_s": 60,
                       "test_accuracy": 0.5, "test_examples": 20, "stop_reason": "time budget"})  # fmt: skip
    else:
        results = _fake(lambda s: {"bleu": 30 * s, "chrf": 50 * s, "bleu_signature": "b", "chrf_signature": "c"},
                        tmp_path / "gone")  # fmt: skip
        log = {"train_pairs": 10, "parameters": 2000, "vocab_size": 100, "epochs_completed": 1,
               "train_wall_s": 60, "bleu": 30.0, "chrf": 50.0, "test_sentences": 20}  # fmt: skip
        results.update(sentences=20, train_log=log)
    (tmp_path / f"{module.NAME}.json").write_text(json.dumps(results))
    module.main(["--render-only", "--results-dir", str(tmp_path)])
    text = (tmp_path / f"{module.NAME}.md").read_text()
    assert (tmp_path / f"{module.NAME}.png").stat().st_size > 0
    if module is vit_cifar:
        # Every poster row of both tables, with its runtime and the runtime ratio to the poster's baseline.
        assert "| 0.9571 |" in text and "| 129.2873 | 0.985 |" in text  # 1 submatrix: 129.2873 / 131.2141
        assert "| 0.4 |" in text and "0.9763" in text and "129.067 | 0.984 |" in text
        assert "| dense |" in text and "| 1.000 | 131.2141 | 1.000 |" in text
        assert "| 0.700 | 129.067 |" in text  # ours: 1.4 s / 2.0 s dense at budget 0.4
    else:
        assert "40% (r = 136) | 31.0818 | 55.9282" in text and "not in the poster" in text  # 0.1 has no poster row
        assert "above the baseline (30.0678) at 40%, 50%" in text
    assert "not given in the issue" not in text


def test_render_only_without_saved_results_says_so(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        vit_cifar.main(["--render-only", "--results-dir", str(tmp_path)])


def test_calibrated_extraction_columns_keep_every_existing_cell():
    from pathlib import Path

    from benchmarks import extract_calibrated

    fragment = (Path(__file__).parents[1] / "benchmarks" / "results" / "ecosystem.md").read_text()
    machine = {"platform": "test", "cpu_count": 2, "torch": "x", "torch_threads": 1, "device": "cpu", "date": "d"}
    row = {"extract_seconds": 12.0, "output_rel_error_mean": 0.25, "budget": 0.1}
    results = {
        "command": "fake", "machine": machine,
        "calibration": {"windows": 32, "tokens": 16384, "seconds": 99.0},
        "rows": {"base": {"perplexity": 37.4}, "tuned": {"perplexity": 23.4},
                 "adapter-whiten@0.1": {**row, "perplexity": 24.4}},
    }  # fmt: skip
    plain = {"rows": {"base": {"perplexity": 37.4}, "tuned": {"perplexity": 23.4}}}
    pending = extract_calibrated.render(fragment, None, None)
    measured = extract_calibrated.render(pending, results, plain)
    assert extract_calibrated.render(measured, results, plain) == measured  # idempotent
    old = fragment.split("\n")
    start = next(i for i, line in enumerate(old) if line.startswith(extract_calibrated.TABLE_HEADER))
    new = measured.split("\n")
    for i in range(start, start + 9):  # header, rule, 7 rows: the first 8 cells byte for byte, then 2 more
        assert "|".join(new[i].split("|")[:9]) == "|".join(old[i].split("|")[:9])
        assert new[i].count("|") == 11
    assert "| 23.67 | 1.021× | 96.6% |" in measured and "| 24.40 | 92.9% |" in measured  # (37.4-24.4)/14
    assert measured.count("| pending | pending |") == 3 and "Pending" not in measured
    assert "16,384 calibration tokens" in measured and "reproduce the plain run's exactly" in measured
    assert "Pending" in pending and pending.count("| pending | pending |") == 4


def test_precision_models_report_compares_stages_at_equal_bytes(tmp_path):
    from benchmarks import precision_models

    def row(recipe, n, bits, accuracy):
        return {"recipe": recipe, "n": n, "bits": bits, "accuracy": accuracy, "stage_dtypes": ["int8"]}

    machine = {"platform": "test", "torch": "x", "torch_threads": 1, "date": "d"}
    rows = [row("one bfloat16 stage", 1, 3, 0.60), row("2 int8 stages", 2, 3, 0.70), row("1 int8 stages", 1, 3, 0.9)]
    rows += [row("one bfloat16 stage", 1, 2, 0.50), row("2 int8 stages", 2, 2, 0.40)]
    path = tmp_path / "precision_models.json"
    path.write_text(
        json.dumps({"command": "fake", "machine": machine, "vit": {"dense": {"accuracy": 0.8}, "rows": rows}})
    )
    text = precision_models.report(path)
    assert "| 2 int8 stages | 0.7 | 0.4 |" in text
    # one int8 stage is not multi-stage: the verdict compares n > 1 with the one float stage
    assert "3 bits/w: the best multi-stage recipe (2 int8 stages, accuracy 0.7) beats one bfloat16 stage (0.6)" in text
    assert "2 bits/w: the best multi-stage recipe (2 int8 stages, accuracy 0.4) does not beat" in text
    assert [s["n"] for s in precision_models.settings(4.5)][-1] == 2 and len(precision_models.settings(3)) == 10


def test_the_speed_figure_colours_each_row_by_its_target(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from benchmarks import speed_plot

    drawn = []
    monkeypatch.setattr(speed_plot, "save_figure", lambda fig, path: drawn.append(fig) or path)
    result = {
        "budget": 0.5, "threads": 1, "date": "d",
        "compress": {"I/O floor": {"ratio_to_floor": 1.0}, "svdlora compress": {"ratio_to_floor": 1.4}},
        "decode": {"dense": {"ratio_to_dense": 1.0}, "pairs": {"ratio_to_dense": 1.4}, "auto": {"ratio_to_dense": 1.6}},
    }  # fmt: skip
    speed_plot.plot(result, tmp_path / "speed.png")
    compress, decode = drawn[0].axes
    colours = [[bar.get_facecolor() for bar in ax.patches] for ax in (compress, decode)]
    gray, green, red = (to_rgba(c) for c in ("tab:gray", "tab:green", "tab:red"))
    assert colours == [[gray, green], [gray, red, green]]


def test_a_healing_rate_sweep_on_pivoted_factors_is_rendered_as_such():
    """heal_sweep --pivot (the factors svdlora compress stores by default): its table names the flag, and the
    first sweep's (factor pairs) keeps its command."""
    from benchmarks.quality_report import heal_rate

    row = {"lr": 1e-4, "heal": {"steps": 24, "first_loss": 0.79, "last_loss": 0.56}, "holdout_kl": 0.70}
    data = {"holdout_windows": 8, "holdout_kl_before": 0.91, "rows": [row],
            "machine": {"torch_threads": 2, "date": "2026-11-29"}}  # fmt: skip
    pivoted = heal_rate({**data, "protocol": {"budget": "0.5", "method": "kfac", "seconds": "100", "pivot": "True",
                                              "lrs": "[1e-05, 3e-05, 0.0001]"}})  # fmt: skip
    pairs = heal_rate({**data, "protocol": {"budget": "0.5", "method": "kfac", "seconds": "100"}})
    assert "--method kfac --pivot --lrs 1e-05 3e-05 0.0001 --seconds 100`, pivoted factors" in pivoted[1]
    assert "2 threads" in pivoted[1]
    assert "--method kfac --seconds 100`):" in pairs[1] and "| 0.0001 | 24 | 0.790 → 0.560 | 0.700 |" in pairs[-1]
