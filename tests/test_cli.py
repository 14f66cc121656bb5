"""The command line, end to end: compress -> info -> export, and every bad input's message."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdlora import load_compressed
from svdlora.cli import main
from svdlora.io import CONFIG_NAME

from .conftest import file_modes, tiny_gpt2
from .eval_helpers import CONFIG_DAMAGE


def run_cli(capsys, *args):
    capsys.readouterr()  # only the command's output: a test's own loads and saves draw transformers' bars
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compress_info_export_through_the_real_entry_point(gpt2_folder, tmp_path):
    out, dense = tmp_path / "svd", tmp_path / "dense"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "svdlora"]
    done = subprocess.run(
        [*cmd, "compress", gpt2_folder, "--budget", "0.5", "--submatrices", "3", "--output", out, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "factorized params" in done.stdout and "transformer.h.0.attn.c_attn" in done.stdout
    info = subprocess.run([*cmd, "info", out], capture_output=True, text=True, env=env)
    assert info.returncode == 0 and "lm_head" in info.stdout and "output head" in info.stdout
    exported = subprocess.run(
        [*cmd, "export", out, "--dense", "--output", dense, "--no-progress"], capture_output=True, text=True, env=env
    )
    assert exported.returncode == 0, exported.stderr  # export takes --no-progress like the other commands

    from transformers import GPT2LMHeadModel  # a plain transformers load of the merged checkpoint

    plain = GPT2LMHeadModel.from_pretrained(dense).eval()
    factorized = load_compressed(out, device="cpu")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, factorized(ids).logits, atol=1e-5)


def test_compress_options_reach_the_report(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "svd"
    code, stdout, _ = run_cli(
        capsys,
        "compress",
        gpt2_folder,
        "--budget",
        "0.3",
        "--submatrices",
        "2",
        "--exclude",
        "*.mlp.*",
        "--svd-method",
        "randomized",
        "--output",
        out,
        "--no-progress",
    )
    assert code == 0
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["report"]["config"]["budget"] == 0.3
    assert config["report"]["config"]["svd_method"] == "randomized"
    modules = {m["name"]: m for m in config["report"]["modules"]}
    assert modules["transformer.h.0.mlp.c_fc"]["dense_reason"] == "matched by --exclude"
    assert len(modules["transformer.h.0.attn.c_attn"]["ranks"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "1.5"], "budget must be in (0, 1], got 1.5"),
        (["--budget", "0"], "budget must be in (0, 1], got 0.0"),
        (["--budget", "abc"], "budget must be a number in (0, 1], got 'abc'"),
        (["--submatrices", "0"], "submatrices must be >= 1, got 0"),
        (["--submatrices", "2.5"], "submatrices must be an integer >= 1, got '2.5'"),
    ],
)
def test_bad_numbers(gpt2_folder, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(gpt2_folder), "--output", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    # one line naming the fix, as every input error (argparse printed the whole usage above it)
    assert err.count("\n") == 1 and err.startswith("svdlora compress: error:") and "--help" in err


@pytest.mark.parametrize("flag", ["--eval", "--calibration"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_data_name_is_refused_by_the_parser(gpt2_folder, tmp_path, capsys, monkeypatch, flag, value):
    """compress --eval '' skipped the evaluation without a word (an empty name is false) and wrote the folder;
    --calibration '' read the working directory (Path('')) as the data. Both are refused before anything runs,
    as svdlora eval --data '' is."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(gpt2_folder), "--output", str(tmp_path / "out"), "--no-progress", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {flag[2:]} must name a file, folder or dataset, got {value!r}" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_no_svd_reference_is_taken_where_nothing_is_computed(gpt2_folder, tmp_path, capsys):
    """--no-svd-reference only skips the exact SVD's error of randomized plain-SVD factors; with exact factors (the
    default) it changes nothing and is taken, not refused (a refusal, 47b2e12, broke scripts that always pass it)."""
    argv = ["compress", gpt2_folder, "-o", tmp_path / "out", "--calibration", "none", "--no-svd-reference"]
    assert run_cli(capsys, *argv, "--no-progress")[0] == 0


def test_a_repeated_pattern_flag_adds_its_patterns(gpt2_folder, tmp_path, capsys):
    """--exclude q_proj --exclude k_proj kept only the last flag's patterns (argparse's nargs): q_proj was
    factorized without a word. A repeated --include / --exclude adds to the patterns, in every command."""
    from svdlora.cli import build_parser

    common = {
        "compress": ["m", "-o", "o"],
        "extract": ["--base", "b", "--tuned", "t", "-o", "o", "--rank", "2"],
        "sweep": ["m", "--data", "d", "-o", "o"],
    }
    for command, argv in common.items():
        args = build_parser().parse_args([command, *argv, "--exclude", "a", "b", "--exclude", "c"])
        assert args.exclude == ["a", "b", "c"], (command, args.exclude)
        if command != "sweep":
            args = build_parser().parse_args([command, *argv, "--include", "a", "--include", "b"])
            assert args.include == ["a", "b"], (command, args.include)
    assert build_parser().parse_args(["compress", "m", "-o", "o"]).exclude == []  # the default stays unshared
    out = tmp_path / "out"
    argv = ["compress", gpt2_folder, "-o", out, "--calibration", "none", "--exclude", "c_fc", "--exclude", "c_attn"]
    assert run_cli(capsys, *argv, "--no-progress")[0] == 0
    dense = {m["name"] for m in json.loads((out / CONFIG_NAME).read_text())["report"]["modules"] if m["dense_reason"]}
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn"} <= dense, dense


def test_a_bad_regex_is_refused_before_the_load_naming_its_flag(gpt2_folder, tmp_path, capsys, monkeypatch):
    from svdlora.cli import compress_run

    loaded = []
    monkeypatch.setattr(compress_run, "load_pretrained", lambda *a, **k: loaded.append(a))
    for flag in ("--include", "--exclude"):
        code, _, err = run_cli(capsys, "compress", gpt2_folder, "--output", tmp_path / "out", flag, "re:((")
        assert code == 2 and f"{flag}: invalid regex pattern 're:(('" in err and "glob" in err
    assert loaded == [] and not (tmp_path / "out").exists()  # was: after the load, without the flag


def test_bad_model_paths(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", tmp_path / "does-not-exist", "--output", out)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "compress", tmp_path / "empty", "--output", out)
    assert code == 2 and "is not a model folder (no config.json)" in err
    code, _, err = run_cli(capsys, "compress", "surely-not-a-real-org/nor-a-model", "--output", out)
    assert code == 2 and "neither a local folder nor downloadable" in err
    assert len(err.strip().splitlines()) == 1, "one clear line"
    assert not out.exists()


def test_existing_output_needs_overwrite(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(capsys, "compress", gpt2_folder, "--output", out)
    assert code == 2 and "already exists: pass --overwrite" in err
    code, _, _ = run_cli(capsys, "compress", gpt2_folder, "--output", out, "--overwrite", "--no-progress")
    assert code == 0 and (out / CONFIG_NAME).exists()


def test_nan_weights_leave_no_output(tmp_path, capsys):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    code, _, err = run_cli(capsys, "compress", tmp_path / "bad", "--output", tmp_path / "out", "--no-progress")
    assert code == 2 and "'transformer.h.1.mlp.c_fc.weight' of the model contains NaN or Inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_info_on_damaged_folders(gpt2_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", gpt2_folder)
    assert code == 2 and "not an svdlora folder" in err
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    weights = out / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as if from another tool
    code, _, err = run_cli(capsys, "export", out, "--dense", "--output", tmp_path / "dense")
    assert code == 2 and "re-run `svdlora compress`" in err
    assert not (tmp_path / "dense").exists()


def test_info_verify_finds_a_nan_inside_a_factor(gpt2_folder, tmp_path, capsys):
    """Loading reads headers and shapes only; `info --verify` reads every value. What it read is part of the report
    (stdout: `info DIR --verify > report.txt` lost it on stderr); with --json, stdout stays the record."""
    from safetensors import safe_open

    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    code, report, err = run_cli(capsys, "info", out, "--verify", "--summary")
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        count = len(list(f.keys()))
    assert code == 0 and f"verified: {count} tensors" in report.splitlines()[-1] and not err, (report, err)
    code, record, err = run_cli(capsys, "info", out, "--verify", "--json")
    assert code == 0 and json.loads(record)["report"] and f"verified: {count} tensors" in err, err
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".B") or k.endswith("pivoted.B"))
    tensors[key][0, 0] = float("nan")  # one corrupted value, same header and shapes
    save_file(tensors, weights, metadata=metadata)
    assert run_cli(capsys, "info", out, "--summary")[0] == 0  # the header check cannot see it
    code, _, err = run_cli(capsys, "info", out, "--verify")
    assert code == 2 and key in err and "NaN or Inf" in err


@pytest.mark.parametrize("dtype", [5, ["float32"], {}])
def test_a_dtype_that_is_no_name_is_refused_as_a_corrupted_field(gpt2_folder, tmp_path, capsys, dtype):
    """svdlora_config.json's dtype was not type-checked: `info` printed 'dtype 5' and export (load_compressed) ended
    as 'internal error TypeError: attribute name must be string, not 'int' - a bug in svdlora' (exit 1)."""
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    data = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**data, "dtype": dtype}))
    for command in (["info", out], ["export", out, "--dense", "-o", tmp_path / "dense"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "field dtype is" in err and len(err.strip().splitlines()) == 1, (command, err)


def test_info_of_a_folder_whose_dtype_is_not_its_weights_is_refused_in_one_line(gpt2_folder, tmp_path, capsys):
    """info (a path given as text) ended in 'internal error TypeError: unsupported operand type(s) for /: 'str' and
    'str'' (exit 1) where the loaders refuse such an edited dtype in one line."""
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")  # float32 weights
    data = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**data, "dtype": "float16"}))
    code, _, err = run_cli(capsys, "info", out)
    assert code == 2 and "says dtype 'float16' but the weights are stored as F32" in err, err


HEALED = {"steps": 5, "loss": "distill", "seconds": 1.0, "first_loss": 3.0, "last_loss": 2.0}
CALIBRATED = {"source": "wiki.txt", "batches": 4, "tokens": 128, "gradients": True, "refit": False}


@pytest.mark.parametrize(
    "field, record",
    [
        ("calibration.tokens", {"calibration": {**CALIBRATED, "tokens": "x"}}),
        ("calibration.tokens", {"calibration": {**CALIBRATED, "tokens": [1]}}),
        ("heal.first_loss", {"heal": {**HEALED, "first_loss": "x"}}),
        ("heal.seconds", {"heal": {k: v for k, v in HEALED.items() if k != "seconds"}}),
    ],
)
def test_info_refuses_a_calibration_or_healing_record_it_cannot_show(gpt2_folder, tmp_path, capsys, field, record):
    """report.calibration and report.heal were checked as objects only: a token count or a loss that is no number
    (or a missing one) ended `info` as 'internal error ValueError: Cannot specify ',' with 's'' or a KeyError (exit
    1, 'a bug in svdlora'); such records, well formed, show as before."""
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    data = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**data, "report": {**data["report"], **record}}))
    code, _, err = run_cli(capsys, "info", out)
    assert code == 2 and f"field report.{field} is" in err and len(err.strip().splitlines()) == 1, err
    (out / CONFIG_NAME).write_text(
        json.dumps({**data, "report": {**data["report"], "calibration": CALIBRATED, "heal": HEALED}})
    )
    code, shown, err = run_cli(capsys, "info", out, "--summary")
    assert code == 0 and "wiki.txt (4 batches, 128 tokens in all)" in shown and "loss 3.0000 -> 2.0000" in shown


def test_a_healing_loss_below_a_thousandth_shows_its_digits(gpt2_folder, tmp_path, capsys):
    """The distillation KL of a near-exact model (full-int8 + int8 repair on tiny GPT-2: 7.2e-08) showed as
    'loss 0.0000 -> 0.0000', in the report and in heal's lines (its warning said the loss rose, 0.0000 -> 0.0000)."""
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    data = json.loads((out / CONFIG_NAME).read_text())
    healed = {**HEALED, "first_loss": 7.172828e-08, "last_loss": 3.761409e-08}
    (out / CONFIG_NAME).write_text(json.dumps({**data, "report": {**data["report"], "heal": healed}}))
    code, shown, _ = run_cli(capsys, "info", out, "--summary")
    assert code == 0 and "loss 7.173e-08 -> 3.761e-08" in shown


def test_info_and_export_read_a_home_relative_folder(gpt2_folder, tmp_path, capsys, monkeypatch):
    """'~/svd' (quoted, or from a script) was 'compressed folder '~/svd' does not exist' for info and export, though
    compress, eval and sweep read '~/...' paths and export's own --output '~/dense' was expanded."""
    run_cli(capsys, "compress", gpt2_folder, "--output", tmp_path / "svd", "--no-progress")
    monkeypatch.setenv("HOME", str(tmp_path))
    code, shown, err = run_cli(capsys, "info", "~/svd", "--summary", "--verify")
    assert code == 0 and "verified:" in shown, err
    code, _, err = run_cli(capsys, "export", "~/svd", "--dense", "-o", "~/dense", "--no-progress")
    assert code == 0 and (tmp_path / "dense" / "model.safetensors").is_file(), err


def test_a_home_relative_model_s_tokenizer_and_size_reach_the_compressed_folder(tmp_path, capsys, monkeypatch):
    """compress '~/m' (in memory; a sweep's pick likewise) loaded the model but wrote its folder without the
    tokenizer ('no tokenizer/processor found for ~/m') and without the dense size (info: no 'bytes on disk')."""
    from .eval_helpers import lm_folder

    model, _ = lm_folder(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = run_cli(capsys, "compress", "~/m", "--calibration", "none", "--no-stream", "-o", "~/svd")
    assert code == 0, err
    assert (tmp_path / "svd" / "tokenizer.json").is_file(), sorted(p.name for p in (tmp_path / "svd").iterdir())
    code, shown, err = run_cli(capsys, "info", tmp_path / "svd", "--summary")
    assert code == 0 and "bytes on disk" in shown, shown


def test_info_verify_finds_corrupted_pivot_indices(gpt2_folder, tmp_path, capsys):
    """A pivoted layer's row indices are int64, so no NaN shows their corruption: `info --verify` said 'every value
    finite' of a folder both loaders then refuse ('pivoted.rows are not increasing row indices')."""
    from safetensors import safe_open

    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")  # pivoted by default
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".pivoted.rows"))
    tensors[key][-1] += 1 << 32  # one corrupted high byte: same header and shapes
    save_file(tensors, weights, metadata=metadata)
    code, _, err = run_cli(capsys, "info", out, "--verify")
    assert code == 2 and key in err and "pivot row indices" in err, err


@pytest.mark.parametrize("stream", [False, True])
def test_compress_eval_with_missing_or_empty_data_fails_before_writing(gpt2_folder, tmp_path, capsys, stream):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for data, message in ((tmp_path / "missing.txt", "does not exist"), (empty, "empty")):
        out = tmp_path / "out"
        argv = ["compress", str(gpt2_folder), "--calibration", "none", "--eval", str(data), "--output", str(out)]
        assert main([*argv, "--no-progress", *(["--stream"] if stream else [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--eval" in err[0] and message in err[0], err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if "svdlora-tmp" in p.name]


@pytest.mark.parametrize("stream", [False, True])
def test_compress_eval_with_data_its_task_cannot_read_fails_before_writing(tmp_path, capsys, stream):
    """compress --eval DATA with data the model's task cannot read (an image folder for a causal LM) compressed and
    wrote the folder, then refused it: the data is now read with the task's loader before anything is written."""
    from PIL import Image

    from .eval_helpers import lm_folder

    folder, _ = lm_folder(tmp_path)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "0.png")
    out = tmp_path / "out"
    argv = ["compress", folder, "-o", out, "--calibration", "none", "--eval", tmp_path / "images", "--no-progress"]
    code, _, err = run_cli(capsys, *argv, *(["--stream"] if stream else []))
    assert code == 2 and "is an image folder, but text-generation needs a text file" in err, err
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_compress_eval_of_images_whose_classes_the_model_does_not_name_fails_before_writing(tmp_path, capsys, stream):
    """compress --eval IMAGES on an image classifier whose labels do not name the class folders compressed and wrote
    the folder, then refused the classes: they are now checked against the meta model's labels before writing."""
    from PIL import Image
    from transformers import ViTImageProcessor

    from .conftest import tiny_vit

    tiny_vit().save_pretrained(tmp_path / "vit")  # labels LABEL_0 .. LABEL_3
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "0.png")
    out = tmp_path / "out"
    argv = ["compress", tmp_path / "vit", "-o", out, "--calibration", "none", "--eval", tmp_path / "images"]
    code, _, err = run_cli(capsys, *argv, "--no-progress", *(["--stream"] if stream else []))
    assert code == 2 and "classes ['cat'] of --data" in err and "are not labels of the model" in err, err
    assert not out.exists()


def test_help_names_only_flags_the_command_has():
    """A help text that names a flag its command lacks (sweep's --pivot help named --stage-dtypes) sends a
    user to an error; flags of other commands are quoted with the command (`svdlora eval --data`)."""
    import argparse

    from svdlora.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        flags = {s for action in parser._actions for s in action.option_strings}
        for action in parser._actions:
            text = re.sub(r"`svdlora [^`]*`", "", action.help or "")
            missing = set(re.findall(r"--[a-z][a-z0-9-]*", text)) - flags
            assert not missing, f"svdlora {name}: the help of {action.dest} names {sorted(missing)}"


def test_help_speaks_of_stage_dtypes_only_where_the_command_has_them():
    """sweep's --allocation help (shared with compress) said '(of its bytes where stage dtypes are set)', and sweep
    has no --stage-dtypes: a user looked for a flag that is not there."""
    import argparse

    from svdlora.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        if any("--stage-dtypes" in action.option_strings for action in parser._actions):
            continue
        for action in parser._actions:
            assert "stage dtype" not in (action.help or ""), f"svdlora {name}: the help of {action.dest}"


def test_sweep_submatrices_help_says_what_compress_does():
    """sweep's --submatrices help said 'factor pairs per matrix', which its default (pivoted factors: the
    stages summed into one pivoted pair) does not store; it reads as compress's: residual SVD stages."""
    import argparse

    from svdlora.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {
        name: next(a.help for a in subparsers.choices[name]._actions if a.dest == "submatrices")
        for name in ("compress", "sweep")
    }
    assert helps["sweep"].startswith(helps["compress"].removesuffix(" (default 1)")), helps


def test_overwrite_help_says_only_svdlora_outputs_are_replaced(gpt2_folder, tmp_path, capsys):
    """--overwrite's help said 'replace an existing output folder', but any folder svdlora did not write
    (and that is not empty) is refused: the help of every command that writes a folder says so."""
    import argparse

    from svdlora.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("compress", "export", "extract", "convert-gguf"):
        text = next(a.help for a in subparsers.choices[name]._actions if a.dest == "overwrite")
        assert "svdlora wrote, or an empty one" in text, (name, text)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    argv = ["compress", gpt2_folder, "-o", other, "--overwrite", "--calibration", "none", "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "holds files svdlora did not write" in err, err


def test_export_writes_its_weights_as_the_umask_allows(gpt2_folder, tmp_path, capsys, group_readable_umask):
    """safetensors 0.8 wrote the dense model.safetensors owner-only (0600), the folder's other files 0644."""
    out, dense = tmp_path / "svd", tmp_path / "dense"
    assert run_cli(capsys, "compress", gpt2_folder, "-o", out, "--calibration", "none", "--no-progress")[0] == 0
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--no-progress")[0] == 0
    modes = file_modes(dense)
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_a_loaded_or_exported_folder_keeps_its_generation_config(tmp_path, capsys):
    """load_compressed built the model from config.json alone: generate() lost the folder's generation_config.json
    (an instruct model's list of end tokens, its sampling defaults), and export --dense wrote the defaults."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = tiny_gpt2()
    model.generation_config.update(eos_token_id=[0, 2], do_sample=True, temperature=0.6)
    model.save_pretrained(tmp_path / "base")
    out, dense = tmp_path / "svd", tmp_path / "dense"
    assert run_cli(capsys, "compress", tmp_path / "base", "-o", out, "--calibration", "none", "--no-progress")[0] == 0
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--no-progress")[0] == 0
    for generation in (
        load_compressed(out, device="cpu").generation_config,
        load_compressed(out, device="cpu", merge=True).generation_config,
        GenerationConfig.from_pretrained(dense),
    ):
        assert (generation.eos_token_id, generation.do_sample, generation.temperature) == ([0, 2], True, 0.6)


def test_export_of_a_plain_pytorch_folder_says_only_transformers_models_export(tmp_path, capsys):
    """export loaded the folder first, which failed on its missing config.json with 'Unrecognized model ...; pass
    load_compressed(path, model=...)', an argument the command line does not have; now before the load."""
    from svdlora import compress, save_compressed

    from .conftest import MLP

    model = MLP()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "mlp")
    code, _, err = run_cli(capsys, "export", tmp_path / "mlp", "--dense", "-o", tmp_path / "dense")
    assert code == 2 and "plain PyTorch model (MLP, no config.json): only transformers models" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "dense").exists()


def test_export_of_a_transformers_folder_without_its_config_json_says_it_is_missing(gpt2_folder, tmp_path, capsys):
    """A transformers model's folder whose config.json was lost was called 'a plain PyTorch model
    (GPT2LMHeadModel, no config.json): only transformers models can be exported'; its record names the class and
    model_type, and the base model's config.json is what it needs back."""
    out = tmp_path / "svd"
    run_cli(capsys, "compress", gpt2_folder, "--output", out, "--no-progress")
    (out / "config.json").unlink()
    code, _, err = run_cli(capsys, "export", out, "--dense", "-o", tmp_path / "dense")
    assert code == 2 and "plain PyTorch" not in err and "config.json is missing" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "dense").exists()


def test_convert_gguf_writes_its_weights_as_the_umask_allows(tmp_path, monkeypatch, capsys, group_readable_umask):
    """As export: the hand-written model.safetensors was 0600. The GGUF reader is stubbed with a tiny Llama."""
    pytest.importorskip("gguf")
    import transformers

    from .conftest import tiny_llama
    from .eval_helpers import word_tokenizer

    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), word_tokenizer("a b c".split())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert run_cli(capsys, "convert-gguf", tmp_path / "m.gguf", "-o", tmp_path / "out")[0] == 0
    modes = file_modes(tmp_path / "out")
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_a_fixed_rank_is_shown_as_such_not_as_the_unused_default_budget(gpt2_folder, tmp_path, capsys):
    """--rank ignores the budget, yet info and the card said 'budget 0.5 (fixed rank 4)' (the default, never
    applied) and the dense export's card '0.5 / 1', the rank left out."""
    out, dense = tmp_path / "svd", tmp_path / "dense"
    assert run_cli(capsys, "compress", gpt2_folder, "-o", out, "--rank", "4", "--calibration", "none")[0] == 0
    code, text, _ = run_cli(capsys, "info", out, "--summary")
    row = next(line for line in text.splitlines() if line.startswith("budget / submatrices"))
    assert code == 0 and row.endswith("  none (fixed rank 4) / 1"), row
    assert "| budget | none (fixed rank 4) |" in (out / "README.md").read_text()
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--no-progress")[0] == 0
    assert "| budget / submatrices | none (fixed rank 4) / 1 |" in (dense / "README.md").read_text()


@pytest.mark.parametrize("command", ["compress", "extract"])
def test_a_fixed_rank_below_the_submatrices_is_refused_naming_both_flags(tmp_path, capsys, command):
    """--rank 2 --submatrices 3 wrote 2 stages in every matrix (split_rank drops stages of rank 0), the flag
    ignored without a word (refused now before the paths are looked at); a budget's ranks differ per matrix, and
    a small matrix may still hold fewer stages (compress's table shows them)."""
    models = ["--base", tmp_path / "base", "--tuned", tmp_path / "tuned"] if command == "extract" else [tmp_path / "m"]
    code, _, err = run_cli(capsys, command, *models, "--rank", "2", "--submatrices", "3", "-o", tmp_path / "out")
    assert code == 2 and "rank 2 cannot be split into 3 submatrices" in err, err
    assert "pass --submatrices 2 or fewer, or --rank 3 or more" in err and not (tmp_path / "out").exists()


def test_a_name_too_long_for_the_filesystem_is_said_so_not_blamed_on_space(tmp_path, capsys):
    """eval --data NAME (and --json NAME) with a name past the filesystem's limit (255 bytes) answered 'File name too
    long (NAME): nothing was written; free space or fix permissions and retry': neither makes it fit."""
    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bars
    for flags in (["--data", "a" * 300], ["--data", text, "--json", tmp_path / ("b" * 300 + ".json")]):
        code, _, err = run_cli(capsys, "eval", model, *flags, "--no-progress")
        assert code == 2 and "File name too long" in err and "longer than the filesystem allows: shorten it" in err
        assert "free space" not in err and "nothing was written" not in err, err


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
@pytest.mark.parametrize(
    "flags", [["eval"], ["eval", "--task", "text-generation"], ["compress"], ["compress", "--stream"], ["sweep"]]
)
def test_a_config_it_cannot_read_is_one_clean_error(tmp_path, capsys, flags, damage):
    """transformers 5 checks a config's field types (huggingface_hub's StrictDataclassFieldValidationError, not a
    ValueError): eval, compress and sweep of a config.json with "n_layer": "two" stopped with 'internal error ... a
    bug in svdlora'; it is a refusal naming the folder, the field and what it holds. So are an unknown model_type
    and a config.json that is not JSON, which compress --stream reported as a disk error ('free space or fix
    permissions'): each builder of a model from config.json (load, the meta model, the streamed plan) refuses them."""
    from .eval_helpers import damage_config, lm_folder

    model, text = lm_folder(tmp_path)
    says = damage_config(model, damage)
    capsys.readouterr()  # save_pretrained's progress bars
    out = ["--data", text] if flags[0] in ("eval", "sweep") else []
    out += ["-o", tmp_path / "out", "--calibration", "none"] if flags[0] != "eval" else []
    code, _, err = run_cli(capsys, *flags[:1], model, *flags[1:], *out, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{str(model)!r}" in err and all(said in err for said in says) and "free space" not in err, err


def test_the_card_front_matter_stays_yaml_whatever_the_base_path(tmp_path, capsys):
    """base_model was written unquoted: a base folder named 'base: v2 #1' made the card's front matter
    invalid YAML (no card reader, the Hub included, could parse it)."""
    import yaml

    base = tmp_path / "base: v2 #1"
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(base)
    out, dense = tmp_path / "svd", tmp_path / "dense"
    assert run_cli(capsys, "compress", base, "-o", out, "--calibration", "none", "--no-progress")[0] == 0
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--no-progress")[0] == 0
    for folder in (out, dense):
        front = (folder / "README.md").read_text().split("---\n")[1]
        assert "base_model" not in yaml.safe_load(front)  # a local folder (see the test below)


def test_the_card_front_matter_names_a_hub_id_as_base_model_never_a_local_folder(tmp_path, capsys):
    """The front matter's base_model was the local base folder: the Hub takes it as a model id and refused
    to upload the folder (400, '"base_model" ... is not valid'). A hub id is kept; a folder is named in the text."""
    import yaml

    from svdlora import card

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(base)
    out = tmp_path / "svd"
    assert run_cli(capsys, "compress", base, "-o", out, "--calibration", "none", "--no-progress")[0] == 0
    text = (out / "README.md").read_text()
    assert "base_model" not in yaml.safe_load(text.split("---\n")[1]) and f"from `{base}`" in text
    hub = card.render("t", "HuggingFaceTB/SmolLM2-135M", [], tags=["svdlora"], library="transformers")
    assert yaml.safe_load(hub.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_an_export_from_another_directory_names_no_relative_base_folder_as_a_hub_id(tmp_path, capsys, monkeypatch):
    """A base folder given relative ('models/gpt2', recorded as given) was left out of the compressed card's front
    matter, but `export` run from another directory did not find it and wrote 'base_model: models/gpt2', a hub
    id the Hub would link to; the compressed folder's own card, judged where compress ran, decides."""
    import yaml

    from svdlora import card

    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "models" / "gpt2")
    monkeypatch.chdir(tmp_path)
    argv = ["compress", "models/gpt2", "-o", "svd", "--calibration", "none", "--no-progress"]
    assert run_cli(capsys, *argv)[0] == 0
    monkeypatch.chdir(tmp_path / "models")
    assert run_cli(capsys, "export", "../svd", "--dense", "-o", "../dense", "--no-progress")[0] == 0
    front = (tmp_path / "dense" / "README.md").read_text().split("---\n")[1]
    assert "base_model" not in yaml.safe_load(front), front
    # a hub id its card named is kept
    (tmp_path / "svd" / "README.md").write_text(card.render("t", "org/gpt2", [], tags=[], library="transformers"))
    data = {"base_model": {"name_or_path": "org/gpt2"}, "report": {}}
    assert yaml.safe_load(card.dense_export_card("../svd", data).split("---\n")[1])["base_model"] == "org/gpt2"


def test_a_card_without_a_base_model_says_unknown_not_none(tmp_path):
    """A model compressed and saved through the Python API, built from a config, has no name: its card's table
    said 'base model | `None`' (the dense export's and an adapter's card too, and the adapter's code
    from_pretrained("None"))."""
    from types import SimpleNamespace

    from svdlora import card, compress, save_compressed

    model = tiny_gpt2()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "svd")
    data = json.loads((tmp_path / "svd" / CONFIG_NAME).read_text())
    extraction = SimpleNamespace(summary_rows=lambda: [], left_out={})
    for text in (
        (tmp_path / "svd" / "README.md").read_text(),
        card.dense_export_card(str(tmp_path / "svd"), data),
        card.adapter_card(extraction, None, None, None),
    ):
        assert "None" not in text and "| base model | unknown |" in text


def test_dense_export_of_an_encoder_decoder_with_a_factorized_head_keeps_its_embeddings(tmp_path, capsys):
    """With --compress-head the config says tie_word_embeddings=False, which in transformers 5 also stops
    Marian tying encoder/decoder embed_tokens to shared: the export wrote shared only, and the dense model
    loaded them randomly initialized. A tied model still writes its embedding once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from svdlora import load_compressed

    from .conftest import example_inputs, tiny_marian

    torch.manual_seed(0)
    tiny_marian().save_pretrained(tmp_path / "marian")
    out, dense = tmp_path / "svd", tmp_path / "dense"
    args = ["--calibration", "none", "--no-progress"]
    assert run_cli(capsys, "compress", tmp_path / "marian", "-o", out, "--compress-head", *args)[0] == 0
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--no-progress")[0] == 0
    inputs = example_inputs("marian")
    with torch.no_grad():
        want = load_compressed(out, merge=True)(**inputs).logits
        got = AutoModelForSeq2SeqLM.from_pretrained(dense)(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert run_cli(capsys, "compress", tmp_path / "gpt2", "-o", tmp_path / "g", *args)[0] == 0
    assert run_cli(capsys, "export", tmp_path / "g", "--dense", "-o", tmp_path / "gd", "--no-progress")[0] == 0
    with safe_open(str(tmp_path / "gd" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to wte: written once
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gd")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_compress_eval_of_a_translator_takes_references_and_refuses_none_before_writing(tmp_path, capsys):
    """compress --eval on a translator with a source-text file failed only after compressing and writing
    ('needs --references FILE'), and compress had no --references: now it has, and without it the run is
    refused before the load."""
    from .eval_helpers import tiny_marian, word_tokenizer

    tok = word_tokenizer(["ein", "mann", "hund", "katze", "haus", "a", "man", "dog", "cat", "house"], eos_suffix=True)
    tiny_marian(len(tok), max_positions=256).save_pretrained(tmp_path / "marian")  # eval: 128 new tokens
    tok.save_pretrained(tmp_path / "marian")
    (tmp_path / "src.txt").write_text("ein mann\nein hund\n")
    (tmp_path / "ref.txt").write_text("a man\na dog\n")
    out = tmp_path / "out"
    argv = ["compress", tmp_path / "marian", "-o", out, "--calibration", "none", "--eval", tmp_path / "src.txt"]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 2 and "needs --references FILE" in err and not out.exists(), err
    code, _, err = run_cli(capsys, *argv, "--references", tmp_path / "ref.txt", "--no-progress")
    assert code == 0, err
    assert "Task `translation`" in (out / "README.md").read_text()  # the figures are in the card


def test_compress_eval_of_a_translator_with_fewer_than_128_decoder_positions_generates_up_to_them(tmp_path, capsys):
    """compress --eval on a translator with 64 decoder positions compressed and wrote the folder, then failed
    ('--max-new-tokens 128 reaches past the model's 64 decoder positions', a flag compress lacks): it now
    generates at most 64 new tokens, as text windows take a causal LM's context."""
    from .eval_helpers import tiny_marian, word_tokenizer

    tok = word_tokenizer(["ein", "mann", "a", "man"], eos_suffix=True)
    tiny_marian(len(tok), max_positions=64).save_pretrained(tmp_path / "marian")
    tok.save_pretrained(tmp_path / "marian")
    (tmp_path / "src.txt").write_text("ein mann\n")
    (tmp_path / "ref.txt").write_text("a man\n")
    out = tmp_path / "out"
    argv = ["compress", tmp_path / "marian", "-o", out, "--calibration", "none", "--eval", tmp_path / "src.txt"]
    code, _, err = run_cli(capsys, *argv, "--references", tmp_path / "ref.txt", "--no-progress")
    assert code == 0, err
    assert "Task `translation`" in (out / "README.md").read_text()


def test_compress_eval_of_a_causal_lm_without_a_context_length_takes_the_capped_windows(tmp_path, capsys):
    """compress --eval on a causal LM whose config gives no context length (Mamba) compressed and wrote the folder,
    then failed ('pass --max-length', a flag compress does not have): it now takes windows of MAX_LENGTH_CAP tokens,
    as for a model whose context is longer."""
    from transformers import MambaConfig, MambaForCausalLM

    from .eval_helpers import word_text, word_tokenizer

    words = "the cat sat on a mat and the dog ran to it".split()
    tok = word_tokenizer(words)
    config = MambaConfig(vocab_size=len(tok), hidden_size=16, state_size=4, num_hidden_layers=1, conv_kernel=4)
    MambaForCausalLM(config).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    (tmp_path / "text.txt").write_text(word_text(words, 40))
    out = tmp_path / "out"
    argv = ["compress", tmp_path / "mamba", "-o", out, "--calibration", "none", "--eval", tmp_path / "text.txt"]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    assert "Task `text-generation`" in (out / "README.md").read_text()


def test_compress_eval_of_a_translator_from_the_hub_refuses_missing_references_before_writing(
    tmp_path, capsys, monkeypatch
):
    """A hub id is not checked before the load (its files come with the model): compress --eval without
    --references on a translator then failed only once the model was compressed and written."""
    import svdlora.evaluation.loading

    from .eval_helpers import tiny_marian, word_tokenizer

    tok = word_tokenizer(["ein", "mann", "a", "man"], eos_suffix=True)
    tiny_marian(len(tok), max_positions=256).save_pretrained(tmp_path / "marian")
    tok.save_pretrained(tmp_path / "marian")
    (tmp_path / "src.txt").write_text("ein mann\n")
    monkeypatch.setattr(svdlora.evaluation.loading, "local_folder", lambda spec: False)  # as for a hub id
    out = tmp_path / "out"
    argv = ["compress", tmp_path / "marian", "-o", out, "--calibration", "none", "--eval", tmp_path / "src.txt"]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 2 and "needs --references FILE" in err and not out.exists(), err


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("bert", ["--stream"], "drop --eval"),  # no task fits it
        ("lm", ["--stream", "--references", "text"], "references is only used by --task translation"),
        ("no-tokenizer", ["--stream"], "cannot load the tokenizer"),
        ("no-tokenizer", [], "cannot load the tokenizer"),  # in memory the load checked all but the tokenizer
    ],
)
def test_compress_eval_of_a_hub_id_is_checked_before_writing(tmp_path, capsys, monkeypatch, model, flags, message):
    """A hub id's --eval was checked only on the loaded model: compress --stream (which loads none) compressed
    and wrote the folder, then refused its options, its task or its missing tokenizer (in memory the missing
    tokenizer too); its config and tokenizer are now read, from the hub or the cache, before anything is written."""
    import svdlora.evaluation.loading

    from .conftest import tiny_bert
    from .eval_helpers import lm_folder

    folder, text = lm_folder(tmp_path)
    folders = {"lm": folder, "bert": tmp_path / "bert", "no-tokenizer": tmp_path / "no-tokenizer"}
    tiny_bert().save_pretrained(folders["bert"])
    tiny_gpt2().save_pretrained(folders["no-tokenizer"])
    monkeypatch.setattr(svdlora.evaluation.loading, "local_folder", lambda spec: False)  # as for a hub id
    out = tmp_path / "out"
    flags = [text if flag == "text" else flag for flag in flags]
    argv = ["compress", folders[model], "-o", out, "--calibration", "none", "--eval", text, *flags, "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and not out.exists(), err


def test_compress_with_calibration_and_eval_reads_the_tokenizer_and_builds_the_meta_model_once(tmp_path, monkeypatch):
    """compress DIR --calibration TEXT --eval TEXT loaded the tokenizer three times (the --eval check, the calibration
    check, the evaluation) and built the meta model twice (the --eval check, the calibration check), then once more
    for the memory check's plan (memory_choice._plan): once each."""
    from .eval_helpers import count_loads, lm_folder

    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--calibration", str(text), "--calibration-samples",
            "2", "--calibration-length", "16", "--eval", str(text), "--eval-limit", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert calls == {"tokenizer": [str(model)], "skeleton": [str(model)]}


def test_compress_stream_with_calibration_builds_the_meta_model_once(tmp_path, monkeypatch):
    """compress DIR --stream --calibration DATA built the folder's meta model twice: for the early checks
    (local_outline), then for the streamed plan (compress_checkpoint): the plan takes the first over."""
    from .eval_helpers import count_loads, lm_folder

    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--stream", "--calibration", str(text),
            "--method", "whiten", "--allocation", "uniform", "--calibration-samples", "2", "--calibration-length", "16",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert calls["skeleton"] == [str(model)]


@pytest.mark.parametrize("how", ["--stream", "for memory"])
def test_a_streamed_global_allocation_builds_the_meta_model_once(tmp_path, monkeypatch, capsys, how):
    """A streamed run with a global allocation (the calibrated default) plans again with the chosen ranks: that plan
    built a second meta model, the first one's targets being swapped; and a run streamed for memory built one more
    (its estimate's plan took the early one over). Each plan hands the model back as built for the next."""
    from svdlora import memory

    from .eval_helpers import count_loads, lm_folder

    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    room = {"available memory": memory.checkpoint_bytes(model)}  # the model fits, not with its factors
    if how == "for memory":
        monkeypatch.setattr(memory, "limits", lambda with_swap=False: room)
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--calibration", str(text), "--calibration-samples",
            "2", "--calibration-length", "16", "--no-progress", *([how] if how == "--stream" else [])]  # fmt: skip
    assert main(argv) == 0
    assert "(streamed" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "svdlora_config.json").read_text())["report"]
    assert report["allocation"] == "global" and report["modules"]
    assert calls["skeleton"] == [str(model)]


def test_a_meta_model_that_cannot_be_built_is_tried_once(tmp_path, monkeypatch):
    """A folder whose meta model cannot be built (a config only its load can judge) was tried three times before the
    load: compress's early outline, then again by the --eval check (early_processor) and the calibration check
    (processor_before_load). The failure now stands: the checks are left to the load."""
    from .eval_helpers import count_loads, lm_folder, unbuildable_meta_model

    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    unbuildable_meta_model(monkeypatch)  # the early checks' builder
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--calibration", str(text), "--calibration-samples",
            "2", "--calibration-length", "16", "--eval", str(text), "--eval-limit", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    # the early outline once; the memory check's plan has its own builder (without weight init), which builds
    assert calls["skeleton"] == [str(model)] * 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--include", "nothing.*"], "--include 'nothing.*' matches none of the"),
        (["--include", "*attn*", "re:.*mpl.*"], "--include 're:.*mpl.*' matches none of the"),
        (["--exclude", "down-proj"], "--exclude 'down-proj' matches none of the"),
    ],
)
def test_a_pattern_that_matches_no_layer_is_refused_before_the_load(gpt2_folder, tmp_path, capsys, monkeypatch,
                                                                   flags, message):  # fmt: skip
    """compress --include / --exclude with a pattern no layer matches was refused only once the model was loaded
    (find_targets); a local folder's patterns are now checked on its meta model, before the load."""

    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", never)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", gpt2_folder, "-o", out, "--calibration", "none", *flags, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_plain_svd_without_patterns_or_eval_builds_no_meta_model(gpt2_folder, tmp_path, capsys, monkeypatch):
    """The early meta model serves --eval, --include/--exclude and calibration; a plain-SVD run needs none
    (the speed benchmark's command), so it does not pay for one."""
    import svdlora.cli.compress_run as compress_run

    built = []
    real = compress_run.local_outline
    monkeypatch.setattr(compress_run, "local_outline", lambda *a: built.append(a) or real(*a))
    code, _, err = run_cli(capsys, "compress", gpt2_folder, "-o", tmp_path / "out", "--calibration", "none",
                           "--budget", "0.5", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert built == []
    run_cli(capsys, "compress", gpt2_folder, "-o", tmp_path / "out2", "--calibration", "none", "--budget", "0.5",
            "--exclude", "*c_fc*", "--no-progress")  # fmt: skip
    assert len(built) == 1


@pytest.mark.parametrize("task", ["text-generation", "translation"])
def test_the_card_says_which_windows_or_generation_length_its_figures_were_measured_with(tmp_path, capsys, task):
    """The card's evaluation named the task, the data and the limit, but not the windows' length and stride
    (perplexity) or the beams and longest generation (translation) the figures depend on: a reader could not
    measure them again. They are in the evaluation's line now, as in the printed table."""
    from .eval_helpers import lm_folder, tiny_marian, word_tokenizer

    if task == "text-generation":
        model, data = lm_folder(tmp_path)  # a GPT-2 of 64 positions: windows of 64 every 32
        flags, want = [], "windows of 64 every 32 tokens"
    else:
        tok = word_tokenizer(["ein", "mann", "a", "man"], eos_suffix=True)
        model, data = tmp_path / "marian", tmp_path / "src.txt"
        tiny_marian(len(tok), max_positions=64).save_pretrained(model)
        tok.save_pretrained(model)
        data.write_text("ein mann\n")
        (tmp_path / "ref.txt").write_text("a man\n")
        flags, want = ["--references", tmp_path / "ref.txt"], "4 beams, <= 64 new tokens"
    out = tmp_path / "out"
    argv = ["compress", model, "-o", out, "--calibration", "none", "--eval", data, *flags, "--eval-limit", "2"]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    line = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("Task `"))
    assert want in line, line


@pytest.mark.parametrize("flags", [[], ["--stream"]])
def test_compress_eval_of_a_text_too_short_to_score_is_refused_before_writing(tmp_path, capsys, flags):
    """compress --eval TEXT where TEXT is one token compressed and wrote the folder, then the perplexity said 'the
    text is 1 token(s) long': the text is now tokenized for the checks before the load."""
    from .eval_helpers import lm_folder

    model, _ = lm_folder(tmp_path)
    (tmp_path / "one.txt").write_text("the\n")
    out = tmp_path / "out"
    argv = ["compress", model, "-o", out, "--calibration", "none", "--eval", tmp_path / "one.txt", *flags]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 2 and "the text is 1 token(s) long" in err and not out.exists(), err


@pytest.mark.parametrize("flags", [[], ["--stream"]])
def test_compress_eval_reads_its_data_once(tmp_path, monkeypatch, flags):
    """compress --eval DATA read DATA for its checks before the load, then again for the evaluation after writing:
    the evaluation now takes what the checks read."""
    import svdlora.evaluation

    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    reads, load_text = [], svdlora.evaluation._LOADERS["text-generation"]
    monkeypatch.setitem(svdlora.evaluation._LOADERS, "text-generation", lambda opts: reads.append(1) or load_text(opts))
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--calibration", "none", "--eval", str(text),
            "--eval-limit", "2", *flags, "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert len(reads) == 1


@pytest.mark.parametrize("flags", [[], ["--stream"]])
def test_compress_eval_reads_a_dataset_s_split_and_column_as_eval_does(tmp_path, capsys, flags):
    """compress --eval took a dataset but none of eval's dataset flags: a dataset whose text sits in another
    column was refused with "pass --text-column", a flag compress lacked, and a hub dataset's config (wikitext's
    wikitext-2-raw-v1) or split could not be named."""
    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    data = tmp_path / "data.json"
    data.write_text("".join(json.dumps({"content": line}) + "\n" for line in text.read_text().splitlines() if line))
    argv = ["compress", str(model), "-o", str(tmp_path / "out"), "--calibration", "none", "--eval", str(data),
            "--eval-limit", "2", *flags, "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "pass --text-column one of ['content']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before compressing
    assert main([*argv, "--text-column", "content", "--split", "train"]) == 0
    assert "perplexity" in (tmp_path / "out" / "README.md").read_text()
    argv = ["compress", str(model), "-o", str(tmp_path / "out2"), "--calibration", "none", "--split", "test"]
    assert main(argv) == 2
    assert "--split read the --eval dataset: pass --eval DATA, or drop them" in capsys.readouterr().err


def test_a_factorized_tied_head_is_said_once_and_only_where_the_run_factorizes_it(tmp_path, caplog):
    """The warning came from the streamed plan, which a memory estimate also builds: an in-memory calibrated run
    whose global allocation then kept the head dense was told its model grew."""
    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    runs = {"--stream": ["--stream", "--calibration", "none"], "in memory": ["--calibration", "none"]}
    runs["calibrated, head kept"] = ["--calibration", str(text)]
    said = {}
    for name, flags in runs.items():
        caplog.clear()
        out = tmp_path / name.replace(" ", "-").replace(",", "")
        assert main(["compress", str(model), "-o", str(out), "--compress-head", *flags, "--no-progress"]) == 0
        said[name] = sum("the model grows by them" in r.getMessage() for r in caplog.records)
        modules = json.loads((out / CONFIG_NAME).read_text())["report"]["modules"]
        head = next(m for m in modules if m["name"] == "lm_head")
        assert bool(head["ranks"]) == (said[name] == 1), (name, head)
    assert said == {"--stream": 1, "in memory": 1, "calibrated, head kept": 0}


@pytest.mark.parametrize("command", ["compress", "extract", "sweep"])
def test_the_pattern_help_names_the_bare_last_name_form(command, capsys):
    """README: 'glob on the full name (*.mlp.*), a bare last name (q_proj), or re:<regex>' (targets.matches)."""
    from svdlora.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a bare last name (q_proj)" in text and "re:REGEX" in text


def test_the_card_of_a_distributed_run_shows_its_launcher(tmp_path, monkeypatch):
    """Under torchrun the card showed `svdlora compress ...`, which runs one process, not the run's world_size
    (recorded in svdlora_config.json); the card written with the folder and the one --eval rewrites show it, as
    `-m svdlora` (`$(which svdlora)` fails where it is pyenv's bash shim)."""
    from svdlora import card, compress
    from svdlora.card_eval import write_card
    from svdlora.io.saving import write_side_files

    monkeypatch.setattr(card, "_cli_argv", ["compress", "m", "-o", "out"])
    model = tiny_gpt2()
    report = compress(model, budget=0.5, progress=False)
    command = "torchrun --nproc_per_node 4 -m svdlora compress m -o out  # 4 processes in all"
    write_side_files(tmp_path, report, source=None, config=None, generation_config=None, class_name="X", dtype=None,
                     world_size=4)  # fmt: skip
    assert command in (tmp_path / "README.md").read_text()
    result = {"task": "text-generation", "model": {"name": "m", "metrics": {"perplexity": 2.0}}, "settings": {}}
    write_card(tmp_path, report, "m", result, "X", world_size=4)  # the streamed run passes its ctx.world_size
    assert command in (tmp_path / "README.md").read_text()
    assert "svdlora compress m -o out" in card.compressed_card(report, "m")  # one process: as before


def test_the_card_of_a_distributed_run_names_an_accelerate_launch_that_starts_its_processes(monkeypatch):
    """The card offered `accelerate launch --num_processes 2` as the same run: on a CPU or one-GPU machine that
    starts one process (accelerate enables several only with --multi_gpu, or on finding several GPUs), which
    compresses in memory, calibrating on self-generated text by default: another model than the card's."""
    from svdlora import card

    monkeypatch.setattr(card, "_cli_argv", ["compress", "m", "-o", "out"])
    assert "accelerate launch --multi_gpu --num_processes 2;" in card.current_command(2)


def test_export_shards_its_dense_weights_by_max_shard_size(gpt2_folder, tmp_path, capsys):
    """export wrote one model.safetensors whatever the size; compress and convert-gguf take --max-shard-size. It is
    read as svdlora reads sizes ('20KiB', which save_pretrained's own reading refuses); a bad size is one line."""
    from transformers import AutoModelForCausalLM

    out, dense = tmp_path / "svd", tmp_path / "dense"
    assert run_cli(capsys, "compress", gpt2_folder, "-o", out, "--calibration", "none", "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "export", out, "--dense", "-o", dense, "--max-shard-size", "5XB", "--no-progress")
    assert code == 2 and "max shard size must look like 5GB" in err and len(err.strip().splitlines()) == 1, err
    assert not dense.exists()
    assert run_cli(capsys, "export", out, "--dense", "-o", dense, "--max-shard-size", "20KiB", "--no-progress")[0] == 0
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dense.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards, shards
    assert all(p.stat().st_size < 2 * 20_480 for p in dense.glob("*.safetensors"))  # a larger tensor: its own shard
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = load_compressed(out, device="cpu", merge=True)(ids).logits
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(dense)(ids).logits, expected)


@pytest.mark.parametrize("command", ["compress", "extract", "sweep", "export"])
def test_no_progress_hides_the_bars_for_the_command_only(tmp_path, capsys, command):
    """--no-progress switched transformers' bars off for the rest of the process: a Python caller of main() (or a
    second command in it) had no 'Loading weights' bar afterwards, with progress=True too. The switch is now set
    back once the command is done, on an error too."""
    from transformers.utils import logging as hf_logging

    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    svd = tmp_path / "svd"
    if command == "export":
        assert run_cli(capsys, "compress", model, "-o", svd, "--calibration", "none", "--no-progress")[0] == 0
        hf_logging.enable_progress_bar()  # as it was before this fix: the command above may have left it off
    if command == "extract":
        from transformers import AutoModelForCausalLM

        changed = AutoModelForCausalLM.from_pretrained(model)
        with torch.no_grad():
            changed.transformer.h[0].mlp.c_fc.weight.add_(0.01)
        changed.save_pretrained(tmp_path / "tuned")
    tuned, adapter, sweep, dense = (tmp_path / name for name in ("tuned", "adapter", "sweep", "dense"))
    argv = {
        "compress": ["compress", model, "-o", svd, "--calibration", "none"],
        "extract": ["extract", "--base", model, "--tuned", tuned, "--rank", "2", "-o", adapter],
        "sweep": ["sweep", model, "--data", text, "-o", sweep, "--budgets", "0.5", "--calibration", "none"],
        "export": ["export", svd, "--dense", "-o", dense],
    }[command]
    capsys.readouterr()  # the tiny model's own save
    try:
        code, _, err = run_cli(capsys, *argv, "--no-progress")
        assert code == 0 and "it/s" not in err, err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()  # the other tests keep their bars, whatever happened
