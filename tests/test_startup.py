"""The command line parses its flags, and `import svdlora` runs, without importing torch (seconds each);
the quantizer still registers itself once transformers loads, and Ctrl-C during the imports is one line."""

from __future__ import annotations

import importlib.abc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import svdlora
from svdlora.cli import main

from .conftest import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = "{'torch', 'transformers', 'safetensors', 'accelerate'} & set(sys.modules)"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_help_and_flag_errors_import_nothing_heavy():
    result = _python(
        f"""
        import contextlib, io, sys
        from svdlora.cli import main
        bad_budget = ["compress", "m", "-o", "x", "--budget", "2"]
        for argv in (["--help"], ["compress", "--help"], ["eval", "--help"], bad_budget):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as stop:
                    assert stop.code in (0, 2), (argv, stop.code)
        print(sorted({HEAVY}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_a_mistyped_dtype_is_a_flag_error_before_torch_is_imported():
    """--dtype was checked only once torch and transformers had loaded (5 s here), in a line that named no flag
    ("dtype must be one of ...; got 'float8'"), where every other mistyped value is refused by the parser."""
    result = _python(
        f"""
        import contextlib, io, sys
        from svdlora.cli import main
        for argv in (["compress", "m", "-o", "x", "--dtype", "float8"], ["eval", "m", "--data", "d", "--dtype", "fp8"],
                     ["extract", "--base", "b", "--tuned", "t", "--rank", "4", "-o", "x", "--dtype", "int8"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as stop:
                    code = stop.code
            assert code == 2, (argv, code)
            print(err.getvalue().strip().splitlines()[-1])
        print(sorted({HEAVY}))
        """
    )
    assert result.returncode == 0, result.stderr
    *lines, heavy = result.stdout.strip().splitlines()
    assert heavy == "[]", result.stdout
    for line, name in zip(lines, ("float8", "fp8", "int8"), strict=True):
        assert f"argument --dtype: dtype must be one of float32, float16, bfloat16, float64; got {name!r}" in line


def test_import_svdlora_registers_the_quantizer_when_transformers_loads(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, budget=0.5, progress=False)
    folder = svdlora.save_compressed(model, tmp_path / "llama-svd")
    load = f"""
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print(sum(type(m).__name__ == "LowRankLinear" for m in model.modules()))
        """
    # svdlora first (nothing heavy yet, the hook registers later), or transformers' modeling code first
    first = _python(f"import sys, svdlora\nprint(sorted({HEAVY}))\n" + textwrap.dedent(load))
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["[]", str(len(model.svdlora_report.factorized))]
    second = _python("import transformers.modeling_utils, svdlora\n" + textwrap.dedent(load))
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [str(len(model.svdlora_report.factorized))]


def test_a_failed_registration_warns_and_leaves_transformers_importable():
    result = _python(
        """
        import sys, types, warnings
        import svdlora
        broken = types.ModuleType("svdlora.integrations")  # as if transformers' registry had changed
        def register():
            raise RuntimeError("registry changed")
        broken.register = register
        sys.modules["svdlora.integrations"] = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import transformers.modeling_utils
        print([str(w.message).split(":")[0] for w in caught if "svdlora" in str(w.message)])
        """
    )
    assert result.returncode == 0, result.stderr
    assert "svdlora could not register its transformers quantizer (RuntimeError('registry changed'))" in result.stdout


def test_the_package_exports_stay_functions_after_their_submodules_load():
    result = _python(
        """
        import svdlora.compress, svdlora.evaluation
        import svdlora
        print(callable(svdlora.compress), callable(svdlora.evaluate), svdlora.compress.__module__)
        from svdlora import compress
        print(compress is svdlora.compress)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "svdlora.compress", "True"]
    # a submodule nothing has imported yet is imported on first use, as when `import svdlora` imported all
    result = _python("import svdlora\nprint(svdlora.integrations.SvdloraQuantizationConfig.__name__)")
    assert result.returncode == 0 and result.stdout.split() == ["SvdloraQuantizationConfig"], result.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        svdlora.nothing  # noqa: B018


class _InterruptImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "svdlora.gguf":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_a_command_imports_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "svdlora.gguf", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport(), *sys.meta_path])
    code = main(["convert-gguf", str(tmp_path / "model.gguf"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["svdlora convert-gguf: interrupted (nothing was written)"]
    assert not (tmp_path / "out").exists()


def test_a_compress_without_data_and_without_bars_does_not_import_datasets(gpt2_folder, tmp_path):
    # --no-progress turns library bars off; datasets' switch only where data is read: its import took ~0.6 s
    # of every compress --no-progress, the issue-10 speed row's command, before the bars helper took it lazily
    result = _python(
        f"""
        import sys
        from svdlora.cli import main
        main(["compress", {str(gpt2_folder)!r}, "--budget", "0.5", "--calibration", "none", "--no-progress",
              "-o", {str(tmp_path / "out")!r}])
        print("datasets imported:", "datasets" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "datasets imported: False" in result.stdout, result.stdout[-500:]
