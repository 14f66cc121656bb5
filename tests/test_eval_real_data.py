"""svdlora eval on real data from the shared folder (WikiText-2, CIFAR-10, Multi30k), skipped without it.

No pretrained model can be had offline, so the models are tiny and untrained: these tests check
that real files (gzipped sentences, JPEG folders, long text with the real GPT-2 tokenizer) go
through the whole pipeline, and that perplexity agrees with the Hugging Face guide's loop.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from svdlora.cli import main
from svdlora.evaluation import evaluate
from svdlora.evaluation.sources import read_lines

from .eval_helpers import compress_to, tiny_marian, word_tokenizer

DATA = Path(os.environ.get("SVDLORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _need(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present")
    return path


def test_wikitext_perplexity_matches_hf_guide_loop(tmp_path, capsys):
    text_file = _need("text", "wikitext-2.test.txt")
    tok = GPT2Tokenizer.from_pretrained(str(_need("gpt2-tokenizer")))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok))).eval()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")

    out_json = tmp_path / "r.json"
    args = [str(tmp_path / "dense"), "--task", "text-generation", "--data", str(text_file), "--limit", "4"]
    assert main(["eval", *args, "--baseline", str(tmp_path / "dense"), "--json", str(out_json), "--no-progress"]) == 0
    result = json.loads(out_json.read_text())
    metrics = result["model"]["metrics"]
    # defaults: the model's context (128) every 64 tokens; 4 windows score 127 + 3 * 64 tokens
    assert result["settings"]["max_length"] == 128 and result["settings"]["stride"] == 64
    assert metrics["windows"] == 4 and metrics["tokens"] == 127 + 3 * 64
    assert result["ratios"]["perplexity"] == 1.0 and result["ratios"]["tokens"] == 1.0

    # The guide's own loop over the same 4 windows, with its mean-loss weighting.
    ids = tok(text_file.read_text(), return_tensors="pt", verbose=False).input_ids
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, 4 * 64, 64):
        end = min(begin + 128, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - 1
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
    guide = math.exp(nll_sum / n_tokens)
    # Same windows and targets; only the guide's one-token-short weights differ (see text.py).
    assert metrics["perplexity"] == pytest.approx(guide, rel=1e-3)


def _cifar_slice(root: Path, per_class: int) -> Path:
    """The first ``per_class`` test JPEGs of each class, read straight out of the archive."""
    archive = _need("cifar10", "cifar10-jpg.tar.gz")
    counts = dict.fromkeys(CIFAR10, 0)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if len(parts) != 3 or not member.isfile():
                continue
            if parts[0] != "test":
                if all(n >= per_class for n in counts.values()):
                    break
                continue
            if counts.get(parts[1], per_class) < per_class:
                counts[parts[1]] += 1
                target = root / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert all(n == per_class for n in counts.values()), counts
    return root


def test_cifar10_jpeg_folder_compressed_vs_dense(tmp_path):
    images = _cifar_slice(tmp_path / "cifar", per_class=5)
    labels = list(reversed(CIFAR10))  # model label order differs from the folder order: matched by name
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        id2label=dict(enumerate(labels)),
        label2id={c: i for i, c in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "dense")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dense")
    compressed = compress_to(model, tmp_path / "svd", tmp_path / "dense")
    result = evaluate(compressed, "image-classification", str(images), baseline=str(tmp_path / "dense"), progress=False)
    assert result["model"]["metrics"]["total"] == 50 == result["baseline"]["metrics"]["total"]
    assert 0 <= result["model"]["metrics"]["accuracy"] <= 1
    assert result["ratios"]["parameters"] < 1
    assert result["settings"]["batch_size"] == 32


@pytest.mark.slow  # ~25 s on 2 busy cores: 200 sentences, 4 beams, two models
def test_multi30k_200_sentences_gzipped(tmp_path, capsys):
    de, en = _need("multi30k", "test_2016_flickr.de.gz"), _need("multi30k", "test_2016_flickr.en.gz")
    sentences = read_lines(de, "--data")[:200] + read_lines(en, "--references")[:200]
    tok = word_tokenizer([w for s in sentences for w in s.split()], eos_suffix=True, split_punctuation=False)
    model = tiny_marian(len(tok), max_positions=128)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    compressed = compress_to(model, tmp_path / "svd", tmp_path / "dense")

    out_json = tmp_path / "r.json"
    args = ["eval", compressed, "--task", "translation", "--data", str(de), "--references", str(en)]
    args += ["--baseline", compressed, "--limit", "200", "--max-new-tokens", "16", "--json", str(out_json)]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chrF" in out and "signature" in out
    result = json.loads(out_json.read_text())
    metrics = result["model"]["metrics"]
    assert metrics["sentences"] == 200 and result["settings"]["num_beams"] == 4
    assert 0 < metrics["chrf"] < 100 and result["ratios"]["chrf"] == 1.0


def test_multi30k_mismatched_files_are_refused_before_loading(tmp_path, capsys):
    # the 2016 test German (1,000 lines) against the validation English (1,014); data is read
    # before any model, so the (missing) model folder is never opened
    de, val_en = _need("multi30k", "test_2016_flickr.de.gz"), _need("multi30k", "val.en.gz")
    code = main(["eval", str(tmp_path / "never-loaded"), "--task", "translation", "--data", str(de),
                 "--references", str(val_en)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "has 1000 lines" in err and "has 1014" in err and "parallel" in err
