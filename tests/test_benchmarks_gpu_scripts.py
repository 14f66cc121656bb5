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


# gpu_rows on tiny shapes: one repeat, a few tokens; dynamo's "cudagraphs" backend compiles in seconds on a CPU
# (there it runs the captured graph as is) where inductor's C++ code generation takes half a minute per variant
GPU_ROWS_SMALL = ["--device", "cpu", "--small", "--deadline", "1200", "--load-repeats", "1", "--decode-repeats", "1",
                  "--new-tokens", "4", "--prefill-tokens", "16", "--prefill-inner", "1", "--svd-repeats", "1",
                  "--svd-reserve", "0", "--eager-repeats", "1", "--compiled-tokens", "4", "--compiled-repeats", "1",
                  "--compile-reserve", "0", "--compile-backend", "cudagraphs"]  # fmt: skip


def _gpu_rows(tmp_path, sections: str, *args: str) -> dict:
    _run("gpu_rows.py", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--sections", sections,
         *GPU_ROWS_SMALL, *args)  # fmt: skip
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    for section in sections.split(","):  # main() records a failing section and goes on: look for its error
        assert "error" not in results[section], results[section].get("traceback")
    return results


def _check_decode_variants(res: dict) -> None:
    variants = ("dense", "pivoted", "pairs", "merged")
    layers = res["layers"]  # 2 blocks x 7 projections
    assert layers["pivoted"]["pivoted_layers"] == 14 and layers["pairs"]["factorized_layers"] == 14
    assert layers["pairs"]["pivoted_layers"] == 0 and layers["merged"]["factorized_layers"] == 0
    assert set(res["compress"]) == {"pivoted", "pairs"}
    for name in variants:
        assert res["eager"][name]["decode_tok_s"]["median"] > 0 and res["eager"][name]["prefill_tok_s"]["median"] > 0
        assert res["compiled"][name]["greedy_tokens_match_eager"] == 1.0, name
        assert res["compiled"][name]["decode_tok_s"]["ratio_to_dense"] > 0
    assert res["compiled"]["pivoted_one_layer_trace"]["graph_break_count"] == 0


def test_gpu_rows_dry_run(tmp_path):
    """The in-process sections: svd and decode135v (decode1b / decode7b run the same code, in the slow test).

    Not covered on a CPU: CUDA timings and memory (cuda_* fields are None), cuSOLVER, and CUDA graphs (the
    cudagraphs backend skips them on a CPU, so "cuda_graphs" is False); inductor is not compiled here."""
    results = _gpu_rows(tmp_path, "svd,decode135v")
    rows = results["svd"]["rows"]
    assert [row["shape"] for row in rows] == [[48, 192], [128, 512], [256, 256]]
    for row in rows:  # the "GPU" is the CPU: the exact routes agree, randomized is no better than exact
        assert abs(row["rel_error"]["gpu_exact"] - row["rel_error"]["cpu_exact"]) < 1e-4
        assert row["rel_error"]["gpu_randomized"] >= row["rel_error"]["gpu_exact"] - 1e-4
        assert all(seconds > 0 for seconds in row["seconds"].values() if isinstance(seconds, float))
    _check_decode_variants(results["decode135v"])
    assert results["models"]["135m"]["config"]["hidden_size"] == 64


@pytest.mark.slow  # ~25 CLI processes, ~4 min on 2 cores
def test_gpu_rows_dry_run_process_sections(tmp_path):
    """The sections that time fresh processes (compress, load), the older decode sections, and the decode
    variants of the 1B and 7B shapes. Not covered on a CPU: as test_gpu_rows_dry_run, and the load child's
    CUDA context and memory figures; the 1B section's load (--no-1b-load) is section_load, as load135."""
    sections = "compress135,load135warm,load135,decode135,1b,decode1b,decode7b"
    results = _gpu_rows(tmp_path, sections, "--no-1b-load")
    assert {"gpu budget 0.5", "cpu budget 0.5", "gpu budget 0.8"} <= set(results["compress135"])
    for section in ("load135warm", "load135"):
        for kind in ("dense", "factorized", "merged"):
            assert results[section][kind]["total_s_median"] > 0, (section, kind)
    assert results["load135warm"]["prewarm"] == "1" and results["load135"]["prewarm"] == "0"
    for dtype in ("bfloat16", "float32"):
        for budget in (0.5, 0.8):
            row = results["decode135"][f"{dtype} budget {budget}"]
            assert {"dense", "factorized", "merged", "auto"} == set(row)
            assert row["dense"]["decode_ratio_to_dense"] == 1.0
    assert {"compress_gpu", "decode", "compress_cpu"} <= set(results["1b"])
    assert results["1b"]["compress_cpu"]["wall_s"] > 0
    for section in ("decode1b", "decode7b"):
        _check_decode_variants(results[section])
