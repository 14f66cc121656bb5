"""The sweep benchmarks (sections 3-5) end to end in --quick mode, so the benchmark code cannot rot.

Each script trains its tiny model for a few steps into ``tmp_path``, runs its two tables on a
few images / sentences / windows, and writes JSON, PNG and Markdown. The data is the shared
folder next to the repository (../shared/data); the tests skip when it is absent.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import language_models, report, translation, vit_cifar
from tests.conftest import shared_data


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts set the global thread count


def outputs(results_dir, name: str) -> tuple[dict, str]:
    """The JSON and Markdown a script wrote; its PNG must exist and be non-empty."""
    png = results_dir / f"{name}_quick.png"
    assert png.is_file() and png.stat().st_size > 1000
    md = (results_dir / f"{name}_quick.md").read_text()
    assert f"({name}_quick.png)" in md and "Command: `python -m benchmarks." in md
    return json.loads((results_dir / f"{name}_quick.json").read_text()), md


def test_vit_cifar_quick(tmp_path):
    archive = shared_data("cifar10", "cifar10-jpg.tar.gz")
    argv = ["--quick", "--data", str(archive), "--cache-dir", str(tmp_path / "cache"),
            "--results-dir", str(tmp_path / "res")]  # fmt: skip
    vit_cifar.main(argv)
    data, md = outputs(tmp_path / "res", "vit_cifar")
    t1, t2 = data["table1"], data["table2"]
    assert [(r["setting"]["svd_method"], r["setting"]["submatrices"]) for r in t1] == [
        (m, n) for m in ("exact", "randomized") for n in (1, 2, 3)
    ]
    assert [r["setting"]["budget"] for r in t2] == [0.1, 0.5, 1.0]
    assert data["dense"]["evals"]["test"]["examples"] == 50
    # Exact SVD at a fixed budget: the same parameters and the same error whatever the number of stages.
    exact = [r for r in t1 if r["setting"]["svd_method"] == "exact"]
    assert len({r["parameters"] for r in exact}) == 1
    assert max(r["rel_error_mean"] for r in exact) - min(r["rel_error_mean"] for r in exact) < 1e-5
    assert all(r["parameters"] < data["dense"]["parameters"] for r in t1 + t2)
    assert "| 1 |" in md and "0.9571" in md and "129.2873" in md and "not given in the issue" not in md
    # A rerun measures nothing: every row comes from the sweep cache.
    again = vit_cifar.main(argv)
    assert again["table1"] == data["table1"] and again["wall_s"] < 30


def test_translation_quick(tmp_path):
    m30k = shared_data("multi30k")
    translation.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res"),
                      "--train-src", str(m30k / "train.de.gz"), "--train-tgt", str(m30k / "train.en.gz"),
                      "--test-src", str(m30k / "test_2016_flickr.de.gz"),
                      "--test-tgt", str(m30k / "test_2016_flickr.en.gz")])  # fmt: skip
    data, md = outputs(tmp_path / "res", "translation")
    assert len(data["table1"]) == 4 and len(data["table2"]) == 2
    metrics = data["table2"][0]["evals"]["test"]["metrics"]
    assert set(metrics) >= {"bleu", "chrf"} and data["sentences"] == 8
    assert "### Table 1" in md and "### Table 2" in md


def test_language_models_quick(tmp_path):
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    text, tok_dir = shared_data("text"), shared_data("gpt2-tokenizer")
    tok = GPT2TokenizerFast.from_pretrained(tok_dir)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=True))  # fmt: skip
    llama.save_pretrained(tmp_path / "tiny-llama")  # stands in for SmolLM2-135M
    tok.save_pretrained(tmp_path / "tiny-llama")
    language_models.main([
        "--quick", "--smollm2", str(tmp_path / "tiny-llama"), "--cache-dir", str(tmp_path / "cache"),
        "--results-dir", str(tmp_path / "res"), "--gpt2-tokenizer", str(tok_dir),
        "--wikitext-test", str(text / "wikitext-2.test.txt"), "--wikitext-train", str(text / "wikitext-2.valid.txt"),
        "--shakespeare", str(text / "tinyshakespeare.txt")])  # fmt: skip
    data, md = outputs(tmp_path / "res", "language_models")
    s, g = data["smollm2"], data["gpt2"]
    assert [r["setting"]["budget"] for r in s["by_budget"]] == [1.0, 0.5]
    assert [r["setting"]["submatrices"] for r in s["by_submatrices"]] == [1, 2]
    assert set(g["dense"]["evals"]) == {"heldout", "wikitext2"} and len(g["rows"]) == 2
    assert all(r["evals"]["wikitext2"]["metrics"]["perplexity"] > 1 for r in g["rows"])
    assert "### SmolLM2-135M" in md and "### GPT-2 architecture" in md


def test_report_orders_sections_and_names_missing_ones(tmp_path):
    (tmp_path / "vit_cifar.md").write_text("## ViT section\n\n![plot](vit_cifar.png)\n")
    (tmp_path / "mnist_blog.md").write_text("## MNIST section\n")
    out = report.assemble(tmp_path, tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    assert text.index("## 1. MNIST section") < text.index("## 3. ViT section") < text.index("## 5. ")
    assert "Not run yet: `python -m benchmarks nnsvd`" in text and "](./vit_cifar.png)" in text


def test_square_roots_benchmark_times_both_roots():
    from benchmarks import square_roots

    rows = square_roots.main(["--sizes", "8", "--wide", "4x8", "--repeats", "1"])
    assert set(rows[8]) == {"eigh_s", "cholesky_s", "lu_solve_s", "triangular_solve_s"}
    assert set(rows["4x8"]) == {"svdvals_wide_s", "svdvals_transposed_s"}
    assert all(v > 0 for row in rows.values() for v in row.values())
