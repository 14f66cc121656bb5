"""Smoke tests for the benchmark trainers (benchmarks/train_*.py) on tiny generated data.

Each trainer runs its ``--quick`` mode end to end on data generated in ``tmp_path`` (so the
shared data folder is not needed), then the saved folder is loaded back with the Auto classes.
"""

from __future__ import annotations

import gzip
import json
import random
import tarfile

import numpy as np
import pytest
import torch

from benchmarks import train_gpt2, train_marian, train_vit, training
from benchmarks.data import CIFAR10_CLASSES, load_cifar10, read_lines

COMMON = ["--quick", "--threads", "1", "--no-progress", "--time-budget-min", "2"]


@pytest.fixture(autouse=True)
def _offline_and_threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the trainers set the global thread count


@pytest.mark.parametrize("module", [train_vit, train_marian, train_gpt2])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "--time-budget-min" in capsys.readouterr().out


def test_schedule_warms_up_then_anneals_to_floor():
    cfg = training.FitConfig(epochs=1, warmup_steps=10, min_lr_ratio=0.1)
    s = training.Schedule(cfg, total_steps=100)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(4) < s.factor(9) > 0.95  # warmup ends near the peak, the cosine has begun
    assert s.factor(100) == pytest.approx(0.1)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 100))


def test_schedule_warmup_capped_by_time_budget():
    cfg = training.FitConfig(epochs=1, warmup_steps=10**6, warmup_frac=0.05, time_budget_min=1)
    s = training.Schedule(cfg, total_steps=10**9)
    s.start -= 6  # 10% of the budget spent: warmup must be over despite the huge warmup_steps
    assert s.factor(50) > 0.9


def test_schedule_follows_time_budget():
    cfg = training.FitConfig(epochs=1, warmup_steps=1, min_lr_ratio=0.0, time_budget_min=1)
    s = training.Schedule(cfg, total_steps=10**9)
    s.start -= 60  # pretend the whole budget is spent
    assert s.progress(5) == 1.0
    assert s.factor(5) == pytest.approx(0.0)


def test_augment_keeps_pixels_and_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    same = train_vit.augment(x, gen, pad=0)  # no padding: only flips remain
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(same, x, strict=True))
    out = train_vit.augment(x, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_length_batches_cover_every_index_once():
    lengths = [random.Random(i).randint(1, 50) for i in range(1000)]
    batches = train_marian.length_batches(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(map(len, batches)) == 32


def test_split_heldout_cuts_at_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    train, held = train_gpt2.split_heldout(text)
    assert train + held == text
    assert train.endswith("\n") and 0.05 < len(held) / len(text) < 0.15


# --- end-to-end quick runs on generated data ---------------------------------------------


def _fake_cifar(tmp_path, per_class: int = 3):
    from PIL import Image

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (src / split / name).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(src / split / name / f"{i:04d}.jpg")
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
        tar.add(src / "test", arcname="test")
    return archive


def test_load_cifar10_decodes_once(tmp_path):
    archive = _fake_cifar(tmp_path, per_class=2)
    x, y = load_cifar10(archive, tmp_path / "cache", "test")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [c for c in range(10) for _ in range(2)]
    archive.unlink()  # the second call must come from the cache alone
    x2, _ = load_cifar10(archive, tmp_path / "cache", "test")
    assert torch.equal(x, x2)


def test_vit_quick_trains_saves_and_caches(tmp_path):
    from transformers import AutoModelForImageClassification

    from svdlora.evaluation.loading import load_processor

    archive = _fake_cifar(tmp_path)
    cache = tmp_path / "cache"
    log = train_vit.main([*COMMON, "--data", str(archive), "--cache-dir", str(cache)])
    out = cache / "vit-cifar10-quick"
    assert log["finished"] and 0.0 <= log["test_accuracy"] <= 1.0 and log["test_examples"] == 30
    assert json.loads((out / "train_log.json").read_text())["steps"] == log["steps"] > 0

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label[3] == "cat"
    processor = load_processor(str(out), "image-classification")  # transformers' loader, torchvision or not
    x, _ = load_cifar10(archive, cache, "test", 10)
    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in x[:2]], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, train_vit.normalize(x[:2]))

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert train_vit.main([*COMMON, "--data", str(archive), "--cache-dir", str(cache)]) == json.loads(
        (out / "train_log.json").read_text()
    )
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # skipped, not retrained


def _fake_parallel(tmp_path, n: int):
    words = {"ein": "a", "Mann": "man", "Hund": "dog", "läuft": "runs", "sitzt": "sits",
             "rot": "red", "groß": "big", "im": "in the", "Park": "park", "Wasser": "water"}  # fmt: skip
    rng = random.Random(0)
    de, en = [], []
    for _ in range(n):
        pick = rng.sample(sorted(words), rng.randint(3, 7))
        de.append(" ".join(pick) + ".")
        en.append(" ".join(words[w] for w in pick) + ".")
    paths = {}
    for name, lines in [("train.de", de), ("train.en", en), ("test.de", de[:8]), ("test.en", en[:8])]:
        paths[name] = tmp_path / f"{name}.gz"
        with gzip.open(paths[name], "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def test_marian_quick_trains_and_reloads(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    p = _fake_parallel(tmp_path, 120)
    assert len(read_lines(p["train.de"])) == 120
    log = train_marian.main([
        *COMMON, "--cache-dir", str(tmp_path / "cache"),
        "--train-src", str(p["train.de"]), "--train-tgt", str(p["train.en"]),
        "--test-src", str(p["test.de"]), "--test-tgt", str(p["test.en"]),
    ])  # fmt: skip
    assert log["finished"] and log["test_sentences"] == 8
    assert log["generation"]["num_beams"] == 4 and log["generation"]["max_new_tokens"] == 64
    assert 0.0 <= log["bleu"] <= 100.0 and 0.0 <= log["chrf"] <= 100.0

    out = tmp_path / "cache" / "marian-multi30k-de-en-quick"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(model).__name__ == "MarianMTModel"
    assert model.config.decoder_start_token_id == tok.pad_token_id == 0
    ids = tok(["ein Hund läuft."])["input_ids"][0]
    assert ids[-1] == tok.eos_token_id and tok.unk_token == "<unk>"
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


@pytest.fixture
def tiny_gpt2_tokenizer(tmp_path):
    """A byte-level BPE saved as vocab.json + merges.txt, the layout of GPT-2's tokenizer folder."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 20,
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save_model(str(folder))
    return folder


def test_gpt2_quick_trains_and_reloads(tmp_path, tiny_gpt2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(0)
    words = "the king and queen of a land where we go to see my lord".split()
    texts = {}
    for name in ("wiki_valid", "wiki_test", "shakes"):
        texts[name] = tmp_path / f"{name}.txt"
        lines = [" ".join(rng.choices(words, k=12)) for _ in range(200)]
        texts[name].write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    log = train_gpt2.main([
        *COMMON, "--cache-dir", str(cache), "--tokenizer", str(tiny_gpt2_tokenizer),
        "--wikitext-train", str(texts["wiki_valid"]), "--wikitext-test", str(texts["wiki_test"]),
        "--shakespeare", str(texts["shakes"]),
    ])  # fmt: skip
    out = cache / "gpt2-small-wt2-quick"
    assert log["finished"] and log["steps"] > 0
    assert 1.0 < log["wikitext2_test_ppl"] < float("inf") and 1.0 < log["heldout_ppl"] < float("inf")
    held = (out / "heldout.txt").read_text()
    assert held and texts["shakes"].read_text().endswith(held)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # kept for the compressor
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>"
