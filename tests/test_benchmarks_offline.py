"""The benchmarks on a machine without the shared data folder or ~/.cache/svdlora.

Their data defaults point at ../shared/data (next to the repository) and at ~/.cache/svdlora, which only
this project's machines have; each default is redirected here to a missing path, as a user's checkout
would see it, and the run must stop at once naming the flag to pass, not in a traceback.
"""

from __future__ import annotations

import gzip
import importlib
from pathlib import Path

import pytest

from benchmarks import __main__ as bench
from benchmarks import (
    heal_sweep,
    language_models,
    precision,
    precision_models,
    quality,
    quality_models,
    train_gpt2,
    train_marian,
    translation,
)
from benchmarks.report import SECTIONS
from tests.conftest import tiny_vit
from tests.test_benchmarks_commands import script_parser

CASES = ("translation test files", "translation training files", "train_marian", "train_gpt2",
         "language_models text", "language_models smollm2", "language_models gpt2 training", "quality", "heal_sweep",
         "precision", "quality_models marian", "precision_models marian")  # fmt: skip


def _gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _cases(tmp_path):
    """(main, argv, flag the error must name, module attributes to point at a missing path; SmolLM2's
    folder, $SVDLORA_HOME/SmolLM2-135M, is missing in every case)."""
    run = ["--quick", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    text = tmp_path / "wiki.txt"
    text.write_text("some text\n")
    tests = ["--test-src", _gz(tmp_path / "t.de.gz", ["ein Hund"]), "--test-tgt", _gz(tmp_path / "t.en.gz", ["a dog"])]
    (tmp_path / "marian").mkdir()
    return {
        "translation test files": (translation.main, run, "--test-src", [(translation, "DEFAULT_DATA")]),
        "translation training files": (translation.main, run + tests, "--train-src", [(translation, "DEFAULT_DATA")]),
        "train_marian": (train_marian.main, run[:3], "--train-src", [(train_marian, "DEFAULT_DATA")]),
        "train_gpt2": (train_gpt2.main, run[:3], "--tokenizer", [(train_gpt2, "DEFAULT_DATA")]),
        "language_models text": (language_models.main, run, "--wikitext-test",
                                 [(language_models, "DEFAULT_DATA")]),
        "language_models smollm2": (language_models.main, [*run, "--wikitext-test", str(text), "--skip-gpt2"],
                                    "--smollm2", []),
        "language_models gpt2 training": (language_models.main, [*run, "--wikitext-test", str(text), "--skip-smollm2"],
                                          "--gpt2-tokenizer", [(language_models, "DEFAULT_DATA")]),
        "quality": (quality.main, ["--quick"], "--model", [(quality, "DEFAULT_DATA")]),
        "heal_sweep": (heal_sweep.main, [], "--model", [(quality, "DEFAULT_DATA")]),
        "precision": (precision.main, ["--part", "levels", "--results", str(tmp_path)], "--model",
                      [(precision, "TEST")]),
        "quality_models marian": (quality_models.main, ["--marian", str(tmp_path / "marian")], "--train-src",
                                  [(quality_models, "DEFAULT_DATA")]),
        "precision_models marian": (precision_models.main, ["--marian", str(tmp_path / "marian")], "--test-src",
                                    [(quality_models, "DEFAULT_DATA")]),
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_missing_default_data_path_stops_naming_its_flag(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SVDLORA_HOME", str(tmp_path / "absent" / "SVDLORA_HOME"))
    main, argv, flag, defaults = _cases(tmp_path)[case]
    for module, name in defaults:
        monkeypatch.setattr(module, name, tmp_path / "absent" / name)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert message.startswith(f"{flag} {tmp_path / 'absent'}") and f"pass {flag}" in message, message


def test_all_data_points_each_section_where_its_defaults_point(tmp_path, monkeypatch):
    """`benchmarks all --data DIR` (the sections' own --data flags are not `all`'s) gives each section
    the files its defaults name under ../shared/data, moved to DIR."""
    calls = {}
    monkeypatch.setattr(bench, "run", lambda name, argv: calls.setdefault(name, argv))
    bench.run_all(["--quick", "--data", str(tmp_path)])
    for name in SECTIONS:
        module = importlib.import_module(f"benchmarks.{name}")
        for attr, value in (("DEFAULT_DATA", tmp_path), ("DEFAULT_MNIST", tmp_path / "mnist")):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, value)
        parser = script_parser(name, [], monkeypatch)  # built with the defaults moved to tmp_path
        defaults, given = vars(parser.parse_args([])), vars(parser.parse_args(calls[name]))
        paths = {k: v for k, v in defaults.items() if isinstance(v, Path) and tmp_path in v.parents}
        assert paths and {k: given[k] for k in paths} == paths, name


@pytest.mark.parametrize(("name", "dest"), [("quality", "model"), ("heal_sweep", "model"), ("precision", "model"),
                                            ("language_models", "smollm2")])  # fmt: skip
def test_the_smollm2_default_follows_svdlora_home(name, dest, tmp_path, monkeypatch):
    """scripts/fetch_smollm2.sh puts the model under $SVDLORA_HOME: every benchmark's default looks there."""
    monkeypatch.setenv("SVDLORA_HOME", str(tmp_path))
    parser = script_parser(name, [], monkeypatch)
    assert getattr(parser.parse_args([]), dest) == tmp_path / "SmolLM2-135M"


@pytest.mark.parametrize(
    ("main", "argv", "flag"),
    [(quality_models.main, ["--cifar-test", "."], "--cifar-train"), (precision_models.main, [], "--cifar-test")],
)
def test_a_vit_run_without_its_image_folders_stops_naming_the_flag(main, argv, flag, tmp_path):
    """precision_models (plain SVD) needs no calibration images; quality_models does."""
    from transformers import ViTImageProcessor

    tiny_vit().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    with pytest.raises(SystemExit) as exc:
        main(["--vit", str(tmp_path / "vit"), *argv])
    assert exc.value.code == f"{flag} is missing; pass it with its location"


def test_the_memory_choice_script_without_its_arguments_prints_its_usage():
    """benchmarks/memory_choice.sh run bare stopped on bash's '$1: unbound variable' (set -u)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_choice.sh"
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and run.stderr.startswith("usage: bash benchmarks/memory_choice.sh MODEL_FOLDER"), run
