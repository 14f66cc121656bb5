"""The GPU benchmark scripts' CPU dry runs (``--small --device cpu``), so they cannot rot between the
sessions that have a GPU: each must run, and its variants must compute what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_gpu_fused_dry_run(tmp_path):
    _run("gpu_fused.py", "--out", str(tmp_path), "--device", "cpu", "--small", "--repeats", "1")
    rows = json.loads((tmp_path / "gpu_fused.json").read_text())["variants"]
    assert {"dense", "pairs", "siblings", "siblings+bmm"} <= set(rows)
    for name, row in rows.items():  # every fused variant computes the pairs' outputs
        assert row["max_abs_diff_vs_pairs"] < 1e-5, name
        assert row["best_us"] > 0


def test_gpu_align_dry_run(tmp_path):
    variants = ",".join(["dense", "pairs8", "pivoted", "pivoted+pairs", "pivoted+auto", "pivoted8+auto-graphs",
                         "pairs8+stacked", "pivoted+pairs+stacked"])  # fmt: skip
    _run("gpu_align.py", "--out", str(tmp_path), "--device", "cpu", "--small", "--eager",
         "--variants", variants, "--repeats", "1", "--tokens", "4")  # fmt: skip
    rows = json.loads((tmp_path / "gpu_align.json").read_text())["variants"]
    assert set(rows) == set(variants.split(","))
    assert rows["pivoted+pairs"]["layouts"] == {"pairs": 14}  # 2 blocks x 7 projections, all as pairs
    assert sum(rows["pivoted+auto"]["layouts"].values()) == 14
    assert sum(rows["pivoted8+auto-graphs"]["layouts"].values()) == 14
    assert rows["pairs8+stacked"]["stacked_groups"] == 4  # q/k/v and gate/up of 2 blocks
    assert rows["pivoted+pairs+stacked"]["stacked_groups"] == 4 and rows["pairs8"]["stacked_groups"] == 0
    assert all(row["tok_s"] > 0 for row in rows.values())


@pytest.mark.slow  # five CLI processes, ~90 s on 2 cores
def test_gpu_calibration_dry_run(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat, and then it ran far away from the big red dog. " * 200)
    tokenizer = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
    if not tokenizer.is_dir():
        pytest.skip("needs ../shared/data/gpt2-tokenizer")
    _run("gpu_calibration.py", "--tokenizer", str(tokenizer), "--text", str(text), "--work", str(tmp_path / "w"),
         "--out", str(tmp_path / "out"), "--device", "cpu", "--small", "--samples", "2", "--blocks", "1")  # fmt: skip
    rows = json.loads((tmp_path / "out" / "gpu_calibration.json").read_text())["rows"]
    for method in ("default", "whiten"):  # the CPU named as the device: the same factors
        assert rows[f"smollm2 {method} agreement"]["same_ranks"] == rows[f"smollm2 {method} agreement"]["layers"]
        assert rows[f"smollm2 {method} agreement"]["max_rel_error_gap"] == 0.0
    assert rows["llama7b default cpu"]["blocks"] == 1
