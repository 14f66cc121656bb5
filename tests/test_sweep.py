"""Sweep and budget bisection; the model card and `info --json`."""

from __future__ import annotations

import json
import re

import pytest

from svdlora.cli import main
from svdlora.errors import BudgetError, SvdloraError
from svdlora.sweep import Point, QualityTarget, SweepInterrupted, SweepStopped, find_budget, parse_target, sweep
from svdlora.sweep_outputs import check_sweep_folder, format_table, write_outputs

from .eval_helpers import lm_folder


def fake_measure(threshold: float, calls: list):
    """Perplexity falls with the budget (monotone); dense = 10; ratio 1.5 is crossed at ``threshold``."""

    def measure(budget):
        calls.append(budget)
        if budget is None:
            return Point(None, 10.0, 1000, 4000)
        ppl = 10.0 * (1 + 0.5 * threshold / budget)  # ppl/dense <= 1.5  <=>  budget >= threshold
        return Point(budget, ppl, int(1000 * budget), int(4000 * budget))

    return measure


@pytest.mark.parametrize("threshold", [0.137, 0.5, 0.81])
def test_bisection_finds_the_threshold(threshold):
    target = parse_target("ppl<=1.5x", "text-generation")
    calls = []
    record = sweep(fake_measure(threshold, calls), [0.3, 0.5, 0.8], "text-generation", target=target, tolerance=0.01)
    chosen = record["target"]["budget"]
    assert threshold <= chosen <= threshold + 0.01 + 1e-9
    assert record["monotone"]
    assert len(calls) <= 4 + 8  # dense + 3 budgets + a bisection of [0, 1] to 0.01


def test_bisection_when_nothing_or_everything_meets():
    dense = Point(None, 10.0, 1, 1)
    measure = fake_measure(0.5, [])

    def meets(limit):
        return lambda p: QualityTarget("", "perplexity", "ratio", limit).met(p.quality, dense.quality, False)

    assert find_budget(measure, meets(1.01), low=0.1, high=1.0)[0] is None  # even budget 1: ppl 15
    assert find_budget(measure, meets(10.0), low=0.1, high=1.0)[0] == 0.1


def test_a_budget_too_small_to_compress_at_is_skipped_not_the_whole_sweep():
    """A listed budget below what rank 1 everywhere needs stopped the sweep after the dense evaluation,
    with nothing written; it is now noted as not measured, and the other budgets are."""
    fits = fake_measure(0.2, [])

    def measure(budget):
        if budget is not None and budget < 0.05:
            raise BudgetError(f"budget {budget} is too small: even rank 1 for every targeted matrix needs more")
        return fits(budget)

    target = parse_target("ppl<=1.5x", "text-generation")
    for record in (
        sweep(measure, [0.01, 0.5], "text-generation"),
        sweep(measure, [0.01, 0.5], "text-generation", target),
    ):
        assert [p["budget"] for p in record["points"]][-1] == 0.5 and record["monotone"]
        assert "too small" in record["skipped"]["0.01"]
        assert "Budget 0.01 not measured: budget 0.01 is too small" in format_table(record)
    assert 0.2 <= record["target"]["budget"] <= 0.22
    with pytest.raises(SvdloraError, match="no budget in --budgets could be measured"):
        sweep(measure, [0.01, 0.02], "text-generation")


def test_a_budget_too_small_names_the_sweep_s_option_and_compress_keeps_its_own(tmp_path):
    """A sweep's skipped budget said 'raise --budget' (compress's option): the sweep takes --budgets. The
    allocator's own error, through the sweep and through compress."""
    import pickle

    import transformers

    from svdlora import compress
    from svdlora.sweep import evaluating_measure

    model_dir, text = lm_folder(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = transformers.AutoTokenizer.from_pretrained(model_dir)
    measure = evaluating_measure(model, processor, "text-generation", str(text), {}, {"progress": False})
    said = sweep(measure, [0.001, 0.5], "text-generation")["skipped"]["0.001"]
    assert "raise --budgets or --exclude the smallest layers" in said, said
    with pytest.raises(BudgetError, match="raise --budget or --exclude the smallest layers") as refused:
        compress(model, budget=0.001, progress=False)
    sent = pickle.loads(pickle.dumps(refused.value))  # a broadcast between ranks keeps it rewordable
    assert "raise --budgets or" in str(sent.for_flag("--budgets"))


def test_a_listed_budget_below_the_search_s_floor_that_meets_the_target_is_chosen():
    """Bisection searched from 0.02 up, so a listed 0.01 that met the target (as the table showed) lost to 0.02."""
    target = parse_target("ppl<=1.5x", "text-generation")
    record = sweep(fake_measure(0.005, []), [0.01, 0.3], "text-generation", target)
    assert record["target"]["budget"] <= 0.01


def test_accuracy_drop_target():
    target = parse_target("acc-drop<=0.02", "image-classification")
    assert target.met(0.90, 0.915, True) and not target.met(0.89, 0.915, True)
    for bad, task in (("ppl<=1.5", "text-generation"), ("acc<=1.5x", "image-classification"),
                      ("ppl<=1.5x", "image-classification"), ("speed>=2", "text-generation")):  # fmt: skip
        with pytest.raises(SvdloraError, match="--target"):
            parse_target(bad, task)


@pytest.mark.parametrize("text", ["ppl<=1.5.2x", "ppl<=.x", "acc-drop<=0..02"])
def test_a_target_whose_number_is_malformed_is_a_target_error_not_a_bug(text):
    """The pattern took any run of digits and dots as the number, and float() of '1.5.2' raised ValueError: the
    CLI said 'internal error ... a bug in svdlora' (exit 1) for a typo in --target."""
    task = "image-classification" if text.startswith("acc") else "text-generation"
    with pytest.raises(SvdloraError, match="expected e.g. 'ppl<=1.5x'"):
        parse_target(text, task)


def test_bisection_ends_at_any_tolerance():
    measure = fake_measure(0.4137, [])
    dense = Point(None, 10.0, 1, 1)

    def meets(p):
        return QualityTarget("", "perplexity", "ratio", 1.5).met(p.quality, dense.quality, False)

    chosen, points = find_budget(measure, meets, low=0.1, high=1.0, tolerance=1e-12)  # below the 6 decimals measured
    assert 0.4137 <= chosen <= 0.4137 + 2e-6 and len(points) < 40
    with pytest.raises(SvdloraError, match="tolerance"):
        find_budget(measure, meets, tolerance=0)


def test_sweep_refuses_to_write_into_its_input_and_a_tolerance_of_zero(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--max-length", "16", "--limit", "2"]
    before = sorted(p.name for p in model.iterdir())
    for output in (model, model / "sweep"):
        assert main([*argv, "--output", str(output), "--no-progress"]) == 2
        assert "input" in capsys.readouterr().err and sorted(p.name for p in model.iterdir()) == before
    with pytest.raises(SystemExit) as refused:  # argparse: one line, exit 2
        main([*argv, "--output", str(tmp_path / "s"), "--tolerance", "0"])
    assert refused.value.code == 2 and "tolerance must be" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_sweep_never_replaces_files_it_did_not_write(tmp_path, capsys, overwrite):
    """Only sweep.json was checked: a user's own sweep.md (or .png) in --output was overwritten, and with
    --overwrite a sweep.json that no sweep wrote too. Now refused before the load; an earlier sweep's
    files are replaced with --overwrite."""
    model, text = lm_folder(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("my notes")
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(mine), "--no-progress"]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    assert "sweep.md" in capsys.readouterr().err and (mine / "sweep.md").read_text() == "my notes"
    write_outputs(sweep(fake_measure(0.4, []), [0.5], "text-generation"), tmp_path / "earlier", "fake")
    check_sweep_folder(tmp_path / "earlier", overwrite=True)  # an earlier sweep's files: replaced


def test_outputs_table_json_plot(tmp_path):
    pytest.importorskip("matplotlib")
    record = sweep(
        fake_measure(0.4, []), [0.3, 0.5], "text-generation", target=parse_target("ppl<=1.5x", "text-generation")
    )
    written = write_outputs(record, tmp_path, "fake")
    assert {p.name for p in written} == {"sweep.md", "sweep.json", "sweep.png"}
    assert "| dense |" in (tmp_path / "sweep.md").read_text()
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["target"]["budget"] >= 0.4 and len(data["points"]) >= 2


def test_the_table_says_when_quality_is_not_monotone_in_the_budget():
    """sweep.json had monotone: false and the log a warning, but sweep.md, what people read, said nothing."""

    def measure(budget):
        ppl = {None: 10.0, 0.3: 20.0, 0.5: 25.0, 0.8: 12.0}[budget]  # 0.5 worse than 0.3
        return Point(budget, ppl, 1000, 4000)

    record = sweep(measure, [0.3, 0.5, 0.8], "text-generation")
    assert record["monotone"] is False
    assert "perplexity is not monotone in the budget over these points" in format_table(record)
    monotone = sweep(fake_measure(0.4, []), [0.3, 0.5], "text-generation")
    assert "not monotone" not in format_table(monotone)


def test_monotone_covers_the_points_the_bisection_measured():
    """monotone was judged over the listed budgets only, before the bisection: a tiny GPT-2's sweep.json
    listed 0.09 at perplexity 15.19 and 0.16 at 15.20 (bisection points) under monotone: true, and sweep.md
    said nothing."""

    def measure(budget):  # 0.3 and 0.8 in order; 0.1 to 0.2 better than 0.3
        ppl = 10.0 if budget is None else 30.0 if budget < 0.1 else 11.5 if budget < 0.2 else 12.0
        return Point(budget, 11.0 if budget == 0.8 else ppl, 1000, 4000)

    target = parse_target("ppl<=1.25x", "text-generation")  # 0.3 meets it: the bisection looks below
    record = sweep(measure, [0.3, 0.8], "text-generation", target=target)
    assert [p["budget"] for p in record["points"]][:2] != [0.3, 0.8]  # the bisection measured below 0.3
    assert record["monotone"] is False
    assert "not monotone" in format_table(record)


def test_the_table_names_the_picked_budget_as_the_target_line_does():
    """The table's budget column had 4 significant digits: a bisection to tolerance 0.001 picked 0.137031
    (the target line, sweep.json, the model's card), whose row read 0.137."""
    target = parse_target("ppl<=1.5x", "text-generation")
    record = sweep(fake_measure(0.137, []), [0.3, 0.5], "text-generation", target=target, tolerance=0.001)
    chosen = record["target"]["budget"]
    table = format_table(record)
    assert f"budget {chosen} " in table and f"| {chosen} |" in table


def test_a_listed_budget_finer_than_the_bisection_is_measured_once():
    """The bisection keys budgets to 6 decimals: a listed 0.1234567, the smallest meeting the target, was
    measured a second time as 0.123457, and the record held both points."""
    calls = []
    target = parse_target("ppl<=1.5x", "text-generation")
    record = sweep(fake_measure(0.1, calls), [0.1234567, 0.5], "text-generation", target=target, tolerance=0.05)
    budgets = [p["budget"] for p in record["points"]]
    assert len({round(b, 6) for b in budgets}) == len(budgets) == len(calls) - 1  # dense: the other call


def test_sweep_cli_end_to_end(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    tmp_path_m, text_path = model, text
    argv = ["sweep", str(tmp_path_m), "--budgets", "0.3,0.8", "--data", str(text_path),
            "--max-length", "16", "--limit", "3", "--target", "ppl<=100x", "--output", str(tmp_path / "s"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    chosen = data["target"]["budget"]
    assert chosen in [p["budget"] for p in data["points"]]  # an untrained model meets 100x at the smallest budget
    assert (
        json.loads((tmp_path / "s" / "model" / "svdlora_config.json").read_text())["report"]["config"]["budget"]
        == chosen
    )
    card = (tmp_path / "s" / "model" / "README.md").read_text()
    assert "svdlora sweep" in card and "## Evaluation" in card and "perplexity" in card
    # the figures are the picked folder's, as compress --eval names them (it said 'model (<dense model> (in memory))')
    assert f"| model ({tmp_path / 's' / 'model'}) |" in card
    assert "GPT2LMHeadModel.from_pretrained" in card  # not AutoModel, which drops the LM head


def test_sweep_passes_calibration_through(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--max-length", "16", "--limit", "2",
            "--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16",
            "--method", "whiten", "--allocation", "uniform", "--target", "ppl<=100x",
            "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["calibration"] == str(text)
    report = json.loads((tmp_path / "s" / "model" / "svdlora_config.json").read_text())["report"]
    assert report["method"] == "whiten" and report["calibration"]["batches"] == 2
    assert "whitened SVD" in (tmp_path / "s" / "model" / "README.md").read_text()


@pytest.mark.parametrize("calibration", ["self", "text"])
def test_the_picked_model_names_its_calibration_data_as_compress_does(tmp_path, capsys, calibration):
    """The sweep reads the calibration batches once and hands them to every compression, so the picked model's
    card and record said '2 batches given in memory' (and not data-free for 'self'); they name the data as
    `svdlora compress` does."""
    model, text = lm_folder(tmp_path)
    given = "self" if calibration == "self" else str(text)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--max-length", "16", "--limit", "2",
            "--calibration", given, "--calibration-samples", "2", "--calibration-length", "16",
            "--target", "ppl<=100x", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    source = "self: text sampled from the model (causal-lm, data-free)" if calibration == "self" else str(text)
    report = json.loads((tmp_path / "s" / "model" / "svdlora_config.json").read_text())["report"]
    assert report["calibration"]["source"] == source and report["calibration"]["data_free"] == (given == "self")
    assert f"| calibration | {source} |" in (tmp_path / "s" / "model" / "README.md").read_text()


def test_compress_card_and_info_json(tmp_path, gpt2_folder, capsys):
    out = tmp_path / "svd"
    assert main(["compress", str(gpt2_folder), "--budget", "0.4", "--output", str(out), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert f"svdlora compress {gpt2_folder} --budget 0.4" in card
    assert "model params before / after" in card and "weight bytes before / after" in card
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"]["config"]["budget"] == 0.4 and data["report"]["modules"]
    assert main(["info", str(out), "--json", "--summary"]) == 0  # --summary was ignored with --json
    summary = json.loads(capsys.readouterr().out)["report"]
    assert "modules" not in summary and summary["bytes_after"] == data["report"]["bytes_after"]
    assert main(["export", str(out), "--dense", "--output", str(tmp_path / "dense")]) == 0
    assert "svdlora export" in (tmp_path / "dense" / "README.md").read_text()
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_compress_eval_goes_into_card_and_is_printed(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    out = tmp_path / "svd"
    argv = ["compress", str(model), "--budget", "0.5", "--eval", str(text), "--eval-limit", "2", "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "perplexity" in card and "--eval" in card
    printed = capsys.readouterr().out  # the figures were measured, then only written into the card
    assert re.search(r"^perplexity +\d", printed, re.M) and "text-generation on" in printed
    assert "calibration" in card and "self" in card  # the default for causal LMs, recorded in the card
    assert "GPT2LMHeadModel.from_pretrained" in card  # rewritten with the usage save_compressed wrote
    row = next(line for line in card.splitlines() if line.startswith("| model ("))
    assert row.startswith(f"| model ({out}) |"), row  # the compressed model, not the base it was made from


def test_a_target_only_budget_1_meets_says_the_model_is_dense(tmp_path, capsys, monkeypatch):
    import svdlora.sweep

    real = svdlora.sweep.sweep

    def settles_on_1(*args, **kwargs):  # an untrained model meets any target early: make 1.0 the answer
        record = real(*args, **kwargs)
        record["points"].append({**record["points"][-1], "budget": 1.0})
        record["target"]["budget"] = 1.0
        return record

    monkeypatch.setattr(svdlora.sweep, "sweep", settles_on_1)
    model, text = lm_folder(tmp_path)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--max-length", "16", "--limit", "2",
            "--target", "ppl<=100x", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "budget 1.0" in err and "holds the dense model" in err, err


def test_sweep_with_a_task_the_model_cannot_do_names_the_task(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    capsys.readouterr()  # the folder's own save_pretrained progress bars
    for task in ("image-classification", "translation"):
        argv = ["sweep", str(model), "--task", task, "--data", str(text), "--output", str(tmp_path / task)]
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--task {task} needs" in err[0] and "use --task text-generation" in err[0], err
        assert not (tmp_path / task).exists()


def test_sweep_refuses_another_tasks_setting_before_compressing(tmp_path, capsys, monkeypatch):
    import svdlora.sweep

    def never(*args, **kwargs):
        raise AssertionError("compressed before the options were checked")

    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", never)
    model, text = lm_folder(tmp_path)
    capsys.readouterr()
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--references", str(text),
            "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "references is only used by --task translation" in capsys.readouterr().err


def test_overwrite_leaves_no_earlier_sweep_s_plot_or_model(tmp_path, capsys, monkeypatch):
    """--overwrite replaced sweep.md and sweep.json but kept the earlier sweep's plot when this one drew none
    (no matplotlib), and its DIR/model when this one picked no budget: files that showed another sweep."""
    import svdlora.sweep
    import svdlora.sweep_outputs

    model, text = lm_folder(tmp_path)
    out = tmp_path / "s"
    write_outputs(sweep(fake_measure(0.4, []), [0.5], "text-generation"), out, "earlier")
    (out / "sweep.png").write_bytes(b"the earlier sweep's plot")
    argv = ["compress", str(model), "--budget", "0.5", "--calibration", "none", "--output", str(out / "model")]
    assert main([*argv, "--no-progress"]) == 0  # the earlier sweep's pick
    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    monkeypatch.setattr(svdlora.sweep_outputs, "plot", lambda *args: None)  # as without matplotlib
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(out), "--overwrite"]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md"]


def test_a_removal_of_the_earlier_pick_stopped_midway_leaves_no_half_folder(tmp_path, capsys, monkeypatch):
    """--overwrite removed the earlier sweep's DIR/model in place: stopped midway (Ctrl-C, a kill) it left DIR/model
    holding svdlora_config.json without its weights, a folder that reads as an svdlora output. It is renamed aside
    (hidden, as a killed run's temporary folder) before it is removed now."""
    import shutil
    from pathlib import Path

    import svdlora.sweep
    from svdlora.io.folder import is_compressed_folder

    model, text = lm_folder(tmp_path)
    out = tmp_path / "s"
    write_outputs(sweep(fake_measure(0.4, []), [0.5], "text-generation"), out, "earlier")
    argv = ["compress", str(model), "--budget", "0.5", "--calibration", "none", "--output", str(out / "model")]
    assert main([*argv, "--no-progress"]) == 0  # the earlier sweep's pick

    def stopped(path, *args, **kwargs):  # Ctrl-C once the weights are gone, the config not yet
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    monkeypatch.setattr(shutil, "rmtree", stopped)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(out), "--overwrite"]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 130
    assert not is_compressed_folder(out / "model")


def test_a_sweep_stopped_while_writing_its_files_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    """sweep.md, sweep.json and sweep.png were replaced one by one, the plot drawn between them: stopped there
    (Ctrl-C, a kill) it left a new table and record beside the earlier sweep's plot. All three are written first
    now, then renamed into place."""
    pytest.importorskip("matplotlib")
    import svdlora.sweep_outputs

    write_outputs(sweep(fake_measure(0.4, []), [0.5], "text-generation"), tmp_path, "earlier")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(svdlora.sweep_outputs, "plot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(sweep(fake_measure(0.3, []), [0.3, 0.5], "text-generation"), tmp_path, "this")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_sweep_whose_files_cannot_be_written_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """write_outputs made the sweep's folder and its missing parents, and left them, empty, when the write
    failed (a full disk); a folder that existed before stays."""
    import errno

    import svdlora.sweep_outputs

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(svdlora.sweep_outputs, "plot", full)
    (tmp_path / "there").mkdir()
    with pytest.raises(OSError, match="No space"):
        write_outputs(sweep(fake_measure(0.4, []), [0.5], "text-generation"), tmp_path / "there/a/b", "fake")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["there"]


def test_a_sweep_whose_tables_cannot_be_written_still_prints_its_figures(tmp_path, capsys, monkeypatch):
    """The table was printed only once sweep.md and sweep.json were written: a disk that filled during the sweep
    lost every figure it had measured ('No space left on device: nothing was written')."""
    import errno

    import svdlora.sweep
    import svdlora.sweep_outputs

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    model, text = lm_folder(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    monkeypatch.setattr(svdlora.sweep_outputs, "files_replaced_together", full)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s")]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 2
    printed = capsys.readouterr()
    assert "| 0.5 | 500 | 2,000 | 14 | 1.400x |" in printed.out and "No space left on device" in printed.err


def test_sweep_evaluates_on_the_default_device_as_eval_does(tmp_path, capsys, monkeypatch):
    """Without --device, the sweep's in-memory models were evaluated where they were loaded (the CPU), on a
    machine with CUDA too, where --help promised CUDA."""
    import svdlora.sweep
    from svdlora.models import default_device

    asked = {}

    def capture(model, processor, task, data, compress_options, eval_options, data_read=None):
        asked.update(eval_options)
        return fake_measure(0.4, [])

    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", capture)
    model, text = lm_folder(tmp_path)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s")]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 0
    assert asked["device"] == str(default_device(None))


@pytest.mark.parametrize("calibration", ["none", "text"])
def test_sweep_on_a_folder_without_a_tokenizer_is_refused_before_loading(tmp_path, capsys, monkeypatch, calibration):
    """The model was loaded (minutes for a 7B model) before its folder's missing tokenizer was noticed, which
    `compress --calibration` refuses at once: the sweep's evaluation needs the tokenizer too."""
    from .conftest import tiny_gpt2

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    _, text = lm_folder(tmp_path)
    tiny_gpt2().save_pretrained(tmp_path / "bare")
    capsys.readouterr()  # save_pretrained's progress bars
    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    argv = ["sweep", str(tmp_path / "bare"), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s"),
            "--calibration", str(text) if calibration == "text" else "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load the tokenizer" in err[0], err
    assert not (tmp_path / "s").exists()


def test_sweep_of_a_text_too_short_to_score_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """The sweep loaded the model (minutes for a 7B one), then read --data and measured the dense model, whose
    perplexity said 'the text is 1 token(s) long': a local folder's data is read and checked before its load."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its text was checked")

    model, _ = lm_folder(tmp_path)
    (tmp_path / "one.txt").write_text("the\n")
    capsys.readouterr()  # save_pretrained's progress bars
    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(tmp_path / "one.txt"), "--calibration", "none",
            "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the text is 1 token(s) long" in err[0], err
    assert not (tmp_path / "s").exists()


def failing_at(failure: float, error: Exception):
    """``fake_measure`` that fails with ``error`` (not a budget's SvdloraError) at budget ``failure``."""
    fits = fake_measure(0.4, [])

    def measure(budget):
        if budget is not None and abs(budget - failure) < 1e-9:
            raise error
        return fits(budget)

    return measure


def test_a_failure_that_is_not_the_budget_s_keeps_the_points_measured_before():
    """An error at the 3rd budget (out of memory, a bug) lost the dense point and the two budgets measured before
    it; the sweep now stops with SweepStopped, whose record holds them and says where it stopped."""
    boom = RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
    with pytest.raises(SweepStopped) as stopped:
        sweep(failing_at(0.8, boom), [0.3, 0.5, 0.8, 0.9], "text-generation")
    record = stopped.value.record
    assert stopped.value.error is boom and [p["budget"] for p in record["points"]] == [0.3, 0.5]
    assert record["dense"]["quality"] == 10.0 and record["monotone"]
    assert record["failed"] == {
        "budget": 0.8,
        "error": "RuntimeError: CUDA error: an illegal memory access was encountered",
    }
    assert "Budget 0.8 failed (RuntimeError: CUDA error" in format_table(record)
    target = parse_target("ppl<=1.5x", "text-generation")  # in the bisection, after the listed budgets
    with pytest.raises(SweepStopped) as stopped:
        sweep(failing_at(0.65, boom), [0.3, 1.0], "text-generation", target)
    record = stopped.value.record
    assert [p["budget"] for p in record["points"]] == [0.3, 1.0] and record["failed"]["budget"] == 0.65
    assert record["target"]["budget"] is None and "not found, the sweep stopped" in format_table(record)


def test_sweep_cli_writes_the_points_before_a_failure_and_exits_with_the_error(tmp_path, capsys, monkeypatch):
    import svdlora.sweep

    boom = RuntimeError("boom")
    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: failing_at(0.8, boom))
    model, text = lm_folder(tmp_path)
    capsys.readouterr()
    out = tmp_path / "s"
    argv = ["sweep", str(model), "--budgets", "0.3,0.5,0.8", "--data", str(text), "--output", str(out)]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 1  # a bug in svdlora, as main says
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == "svdlora sweep: kept the 2 point(s) measured before budget 0.8 failed", err
    assert err[-1].startswith("svdlora sweep: error: internal error RuntimeError: boom"), err
    data = json.loads((out / "sweep.json").read_text())
    assert [p["budget"] for p in data["points"]] == [0.3, 0.5] and data["failed"]["budget"] == 0.8
    assert "Budget 0.8 failed" in (out / "sweep.md").read_text()
    check_sweep_folder(out, overwrite=True)  # a stopped sweep's files: replaced by the next with --overwrite


def test_sweep_outputs_name_the_data_measured_on(tmp_path, capsys):
    """sweep.json kept each point's settings (limit, windows) but not the data its figures were measured on,
    and sweep.md neither: they name it (source, split, examples), as `svdlora eval` and the card do."""
    model, text = lm_folder(tmp_path)
    out = tmp_path / "s"
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--limit", "2", "--output", str(out)]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 0
    record = json.loads((out / "sweep.json").read_text())
    for point in [record["dense"], *record["points"]]:
        assert point["data"] == {"source": str(text), "config": None, "split": None, "examples": 2}
    measured = f"Measured on {text} (2 examples, limit 2; windows of 64 every 32 tokens)."
    assert measured in (out / "sweep.md").read_text() and measured in capsys.readouterr().out


def test_ctrl_c_keeps_the_points_measured_before(tmp_path, capsys, monkeypatch):
    """Ctrl-C at the 3rd budget lost the points measured before it ('interrupted (nothing was written)'); the
    sweep now raises SweepInterrupted (still a KeyboardInterrupt) holding them, and the CLI writes them and
    exits 130."""
    import svdlora.sweep

    with pytest.raises(SweepInterrupted) as stopped:
        sweep(failing_at(0.8, KeyboardInterrupt()), [0.3, 0.5, 0.8], "text-generation")
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert [p["budget"] for p in stopped.value.record["points"]] == [0.3, 0.5]
    assert stopped.value.record["failed"] == {"budget": 0.8, "error": "interrupted"}
    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: failing_at(0.8, KeyboardInterrupt()))
    model, text = lm_folder(tmp_path)
    capsys.readouterr()
    out = tmp_path / "s"
    argv = ["sweep", str(model), "--budgets", "0.3,0.5,0.8", "--data", str(text), "--output", str(out)]
    assert main([*argv, "--no-progress", "--calibration", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "svdlora sweep: interrupted at budget 0.8; kept the 2 point(s) measured before", err
    assert [p["budget"] for p in json.loads((out / "sweep.json").read_text())["points"]] == [0.3, 0.5]


@pytest.mark.parametrize("output", ["notes.txt", "notes.txt/sweep"])
def test_an_output_that_is_a_file_is_refused_before_the_sweep(tmp_path, capsys, monkeypatch, output):
    """sweep --output FILE (or a folder inside one) loaded the model and measured every budget, then failed writing
    its tables with 'File exists (FILE): nothing was written; free space or fix permissions and retry'."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    model, text = lm_folder(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    capsys.readouterr()
    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    argv = ["sweep", str(model), "--data", str(text), "-o", str(tmp_path / output), "--calibration", "none"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"svdlora sweep: error: --output {str(tmp_path / output)!r}: {str(notes)!r} is a file, not a folder"]
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("flags", [["--method", "whiten"], ["--allocation", "global"], ["--heal-steps", "2"]])
def test_settings_that_need_calibration_data_are_refused_before_loading(tmp_path, capsys, monkeypatch, flags):
    """sweep --calibration none --method whiten loaded and evaluated the dense model, then failed alike at every
    budget, which it took for budgets too small: with --target it ended 'no budget up to 1.0 meets ...: relax the
    target'. Refused now before the load, as compress (in memory: after its load) now does too."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    model, text = lm_folder(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", never)
    sweep_argv = ["sweep", str(model), "--data", str(text), "--target", "ppl<=100x", "-o", str(tmp_path / "s")]
    compress_argv = ["compress", str(model), "-o", str(tmp_path / "c")]
    for argv in (sweep_argv, compress_argv):
        assert main([*argv, "--calibration", "none", *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs calibration data: pass --calibration DATA" in err[0], err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_sweep_loads_the_tokenizer_once_before_the_model(tmp_path, capsys, monkeypatch):
    """sweep --calibration DATA loaded the tokenizer for the early task check, then again for the calibration's
    check, the same files: the checked one is passed on."""
    import transformers

    import svdlora.sweep

    original = transformers.AutoTokenizer.from_pretrained.__func__
    calls = []

    def counting(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counting))
    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    model, text = lm_folder(tmp_path)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s"),
            "--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16"]  # fmt: skip
    assert main([*argv, "--no-progress"]) == 0
    assert calls == [str(model)]


def test_card_eval_table_keeps_a_translation_s_signatures_in_their_cells():
    """sacrebleu's signatures ('nrefs:1|case:mixed|...') went into the card's eval table as they are: each '|'
    split the row into more cells than the header has."""
    from svdlora import card

    metrics = {"bleu": 12.5, "bleu_signature": "nrefs:1|case:mixed|eff:no", "sentences": 2}
    result = {"task": "translation", "model": {"name": "out", "metrics": metrics}}
    text = card.render("t", None, [], tags=[], library="transformers", eval_result=result)
    header, _, row = text.split("## Evaluation")[1].strip().splitlines()[2:5]

    def cells(line):
        return len(line.replace("\\|", "").split("|"))

    assert cells(row) == cells(header) and "nrefs:1\\|case:mixed\\|eff:no" in row, (header, row)


def test_card_eval_names_the_split_read_and_no_limit():
    """The card's eval line dropped the dataset split the figures were measured on (the test split where
    --split was not given, which `svdlora eval`'s table names) and read 'limit None' without --eval-limit."""
    from svdlora import card

    result = {
        "task": "text-generation", "data": {"source": "wikitext", "split": "test", "examples": 4},
        "settings": {"limit": None}, "model": {"name": "out", "metrics": {"perplexity": 20.0}},
    }  # fmt: skip
    text = card.render("t", None, [], tags=[], library="transformers", eval_result=result)
    assert "on `wikitext` [test] (4 examples, no limit)" in text, text


def test_sweep_builds_the_meta_model_once_before_the_model(tmp_path, monkeypatch):
    """sweep --calibration DATA built the local folder's meta model twice (the early task check, then the
    calibration's check): the first is passed on."""
    import svdlora.sweep

    from .eval_helpers import count_loads

    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s"),
            "--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16"]  # fmt: skip
    assert main([*argv, "--no-progress"]) == 0
    assert calls == {"tokenizer": [str(model)], "skeleton": [str(model)]}


def test_sweep_tries_a_meta_model_that_cannot_be_built_once(tmp_path, monkeypatch):
    """sweep --calibration DATA tried a folder's meta model that cannot be built three times (the early outline,
    then early_processor and processor_before_load again): the failure now stands, the checks are left to the load."""
    import svdlora.sweep

    from .eval_helpers import count_loads, unbuildable_meta_model

    monkeypatch.setattr(svdlora.sweep, "evaluating_measure", lambda *args: fake_measure(0.4, []))
    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    unbuildable_meta_model(monkeypatch)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--output", str(tmp_path / "s"),
            "--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16"]  # fmt: skip
    assert main([*argv, "--no-progress"]) == 0
    assert calls["skeleton"] == [str(model)]


def test_sweep_of_a_translator_with_fewer_than_128_decoder_positions_generates_up_to_them(tmp_path, capsys):
    """sweep on a translator with 64 decoder positions failed at the dense model's evaluation with
    '--max-new-tokens 128 reaches past the model's 64 decoder positions: pass --max-new-tokens 64', a flag sweep
    lacks: as compress --eval, it now generates at most the model's positions."""
    from .eval_helpers import tiny_marian, word_tokenizer

    tok = word_tokenizer(["ein", "mann", "a", "man"], eos_suffix=True)
    tiny_marian(len(tok), max_positions=64).save_pretrained(tmp_path / "marian")
    tok.save_pretrained(tmp_path / "marian")
    (tmp_path / "src.txt").write_text("ein mann\n")
    (tmp_path / "ref.txt").write_text("a man\n")
    argv = ["sweep", str(tmp_path / "marian"), "--budgets", "0.5", "--data", str(tmp_path / "src.txt"),
            "--references", str(tmp_path / "ref.txt"), "--calibration", "none", "--output", str(tmp_path / "s"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert record["dense"]["settings"]["max_new_tokens"] == 64


def test_sweep_reads_a_dataset_s_split_and_column_as_eval_does(tmp_path, capsys):
    """sweep took --data 'as for svdlora eval' but had none of its dataset flags: a dataset whose text is in
    another column was refused with "pass --text-column", a flag sweep did not have."""
    model, text = lm_folder(tmp_path)
    rows = [{"content": line} for line in text.read_text().splitlines() if line.strip()]
    data = tmp_path / "data.json"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(data), "--max-length", "16", "--limit", "2",
            "--calibration", "none", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "pass --text-column one of ['content']" in capsys.readouterr().err
    assert main([*argv, "--text-column", "content", "--split", "train", "--overwrite"]) == 0
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["budget"] for p in record["points"]] == [0.5]


def test_sweep_reads_its_data_once_for_every_point(tmp_path, monkeypatch):
    """Each point (the dense model's, each budget's) read --data again; it is read once, before the first
    compression, as compress --eval reads it."""
    import svdlora.evaluation

    model, text = lm_folder(tmp_path)
    reads, load_text = [], svdlora.evaluation._LOADERS["text-generation"]
    monkeypatch.setitem(svdlora.evaluation._LOADERS, "text-generation", lambda opts: reads.append(1) or load_text(opts))
    argv = ["sweep", str(model), "--budgets", "0.3,0.8", "--data", str(text), "--max-length", "16", "--limit", "2",
            "--calibration", "none", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert len(reads) == 1 and len(json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]) == 2


def test_an_exclude_pattern_that_matches_no_layer_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    """sweep --exclude with a typo loaded and measured the dense model, then took every budget as too small
    ('no budget in --budgets could be measured (...): list larger ones'); it is refused as compress refuses
    it, before the model loads."""
    import svdlora.models

    model, text = lm_folder(tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(svdlora.models, "load_pretrained", no_load)
    argv = ["sweep", str(model), "--budgets", "0.5", "--data", str(text), "--exclude", "nosuch",
            "--calibration", "none", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    code, err = main(argv), capsys.readouterr().err
    assert code == 2 and "--exclude 'nosuch' matches none of the" in err, err
    assert not (tmp_path / "s").exists()


def test_an_error_that_is_not_the_budget_s_stops_the_sweep_with_its_own_message(tmp_path):
    """Every SvdloraError at a budget was taken for too small a budget: calibration that is no data (met at every
    budget alike) ended with --target as 'no budget meets the target', and without one as 'list larger budgets'.
    Only a BudgetError (allocate / precision: too small) is skipped now; the real too-small budget still is."""
    import transformers

    from svdlora.sweep import evaluating_measure

    model_dir, text = lm_folder(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = transformers.AutoTokenizer.from_pretrained(model_dir)

    def measure(calibration):
        options = {"method": "whiten", "calibration": calibration}
        return evaluating_measure(model, processor, "text-generation", str(text), options, {"progress": False})

    ids = processor("the cat sat on the mat", return_tensors="pt")
    record = sweep(measure([dict(ids)]), [0.001, 0.5], "text-generation")
    assert "too small" in record["skipped"]["0.001"] and [p["budget"] for p in record["points"]] == [0.5]
    target = parse_target("ppl<=100x", "text-generation")
    with pytest.raises(SweepStopped) as stopped:
        sweep(measure(["the cat sat on the mat"]), [0.001, 0.5], "text-generation", target)
    assert isinstance(stopped.value.error, SvdloraError) and "tokenize it first" in str(stopped.value.error)
    assert stopped.value.record["failed"]["budget"] == 0.001  # the data is refused before the allocation


def counting_plan_calls(monkeypatch, *names: str) -> list:
    """The name of each call of svdlora.plan's functions ``names``, in order."""
    import svdlora.plan

    calls = []
    for name in names:
        function = getattr(svdlora.plan, name)
        monkeypatch.setattr(svdlora.plan, name, lambda *a, _f=function, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def counting_collections(monkeypatch) -> list:
    """Each call of the calibration statistics' collection (a forward and, for kfac, a backward per batch)."""
    return counting_plan_calls(monkeypatch, "collect_statistics")


def test_a_sweep_collects_the_calibration_statistics_once_for_every_budget(tmp_path, monkeypatch):
    """evaluating_measure's compression at each budget collected the calibration statistics again (method kfac:
    a forward and a backward per batch), though they do not depend on the budget; they are collected once, on the
    dense model, and every budget's factors and perplexity are those of a compression that collects its own.
    The weightings computed from them (input whitenings, kfac's output factors) are computed once too."""
    import copy
    import sys

    import torch

    from svdlora.evaluation import evaluate
    from svdlora.sweep import evaluating_measure

    from .conftest import tiny_llama
    from .eval_helpers import word_text, word_tokenizer

    words = "the cat sat on a mat and the dog ran to it".split()
    tok, text = word_tokenizer(words), tmp_path / "text.txt"
    text.write_text(word_text(words))
    torch.manual_seed(0)
    model = tiny_llama().eval()
    options = {"method": "kfac", "calibration": str(text), "processor": tok, "calibration_samples": 3,
               "calibration_length": 16}  # fmt: skip
    eval_options = {"max_length": 16, "limit": 2, "progress": False}
    compress_module = sys.modules["svdlora.compress"]
    expected, fills, alone_fills = {}, counting_plan_calls(monkeypatch, "whitening", "output_weights"), []
    for budget in (0.5, 0.8):  # each budget's own collection, as before
        alone = copy.deepcopy(model)
        compress_module.compress(alone, budget=budget, progress=False, **options)
        alone_fills.append(fills[:])
        fills.clear()
        ppl = evaluate((alone, tok), task="text-generation", data=str(text), **eval_options)["model"]["metrics"]
        expected[budget] = (alone.state_dict(), ppl["perplexity"])

    swept, compress = {}, compress_module.compress

    def keeping(candidate, budget, **kwargs):
        report = compress(candidate, budget=budget, **kwargs)
        swept[budget] = candidate.state_dict()
        return report

    monkeypatch.setattr(compress_module, "compress", keeping)
    calls = counting_collections(monkeypatch)
    once = alone_fills[0]  # global allocation weighs every layer: the same fills at each budget
    assert alone_fills[1] == once and "output_weights" in once
    measure = evaluating_measure(model, tok, "text-generation", str(text), options, eval_options)
    record = sweep(measure, [0.5, 0.8], "text-generation")
    assert len(calls) == 1 and fills == once
    assert {p["budget"]: p["quality"] for p in record["points"]} == {b: ppl for b, (_, ppl) in expected.items()}
    for budget, (state, _) in expected.items():
        assert swept[budget].keys() == state.keys()
        assert all(torch.equal(swept[budget][k], state[k]) for k in state), budget


def test_the_sweep_command_collects_the_calibration_statistics_once(tmp_path, capsys, monkeypatch):
    """The sweep's budgets, its bisection and the picked budget's compression each collected the statistics."""
    model, text = lm_folder(tmp_path)
    calls = counting_collections(monkeypatch)
    argv = ["sweep", str(model), "--budgets", "0.3,0.8", "--data", str(text), "--max-length", "16", "--limit", "2",
            "--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16",
            "--target", "ppl<=1.01x", "--output", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(record["points"]) > 2 and len(calls) == 1  # the bisection measured more budgets
    report = json.loads((tmp_path / "s" / "model" / "svdlora_config.json").read_text())["report"]
    assert report["method"] == "kfac" and report["calibration"]["batches"] == 2
