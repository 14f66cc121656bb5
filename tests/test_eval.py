"""svdlora eval: every task end to end through the CLI, exact perplexity, schema, bad inputs.

Everything is built offline in the test: tiny GPT-2 / ViT / Marian models from configs, word-level
tokenizers, random images; so these run anywhere in well under a minute.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import svdlora
from svdlora.cli import main
from svdlora.evaluation import (
    DATA_KEYS,
    METRIC_KEYS,
    MODEL_KEYS,
    RESULT_KEYS,
    SETTINGS_KEYS,
    evaluate,
    format_table,
)
from svdlora.evaluation.images import label_ids
from svdlora.evaluation.report import RATIO_FIELDS
from svdlora.evaluation.text import sliding_windows

from .eval_helpers import compress_to, tiny_marian, tiny_whisper, word_tokenizer

WORDS = (
    "the a man woman dog cat sits runs on in under big small red blue house tree street park ball "
    "ein eine mann frau hund katze sitzt läuft auf im unter groß klein rot blau haus baum straße"
).split()
TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(300))  # 300 tokens, deterministic
CLASSES = ("bird", "cat", "dog")


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)))
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    compressed = compress_to(model, root / "svd", root / "dense")
    (root / "text.txt").write_text(TEXT)
    return {"dense": str(root / "dense"), "svd": compressed, "text": str(root / "text.txt"), "root": root}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(root / "dense")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "dense")
    compressed = compress_to(model, root / "svd", root / "dense")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    return {"dense": str(root / "dense"), "svd": compressed, "images": str(root / "images"), "root": root}


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    tok = word_tokenizer(WORDS, eos_suffix=True)
    model = tiny_marian(len(tok))
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    sources = ["ein mann sitzt", "der hund läuft im park", "eine katze", "rot blau haus baum", "klein"]
    (root / "src.txt").write_text("\n".join(sources) + "\n")
    # References = the dense model's own greedy outputs, so BLEU and chrF are exactly 100.
    enc = tok(sources, return_tensors="pt", padding=True)
    out = model.generate(**enc, num_beams=1, max_new_tokens=6, do_sample=False)
    references = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert all(references), references
    (root / "ref.txt").write_text("\n".join(references) + "\n")
    compressed = compress_to(model, root / "svd", root / "dense")
    return {
        "dense": str(root / "dense"),
        "svd": compressed,
        "src": str(root / "src.txt"),
        "ref": str(root / "ref.txt"),
        "root": root,
        "sources": sources,
        "references": references,
    }


def _cli(args, capsys):
    code = main(["eval", *args, "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_schema(result: dict, task: str, baseline: bool) -> None:
    assert set(result) == set(RESULT_KEYS)
    assert set(result["data"]) == set(DATA_KEYS)
    assert set(result["settings"]) == set(SETTINGS_KEYS)
    entries = [result["model"]] + ([result["baseline"]] if baseline else [])
    for entry in entries:
        assert set(entry) == set(MODEL_KEYS)
        assert set(entry["metrics"]) == set(METRIC_KEYS[task])
        assert entry["parameters"] > 0 and entry["peak_memory_bytes"] >= entry["model_memory_bytes"] > 0
        assert entry["wall_time_s"] >= entry["model_time_s"] > 0 and entry["throughput"] > 0
    if baseline:
        numeric = {k for k, v in result["model"]["metrics"].items() if not isinstance(v, str)}
        assert set(result["ratios"]) == set(RATIO_FIELDS) | numeric
    else:
        assert result["baseline"] is None and result["ratios"] is None
    assert json.loads(json.dumps(result)) == result  # plain JSON types only


# ------------------------------------------------------------------ end to end, CLI
def test_text_generation_cli_compressed_vs_dense(gpt, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _cli(
        [
            gpt["svd"],
            "--task",
            "text-generation",
            "--data",
            gpt["text"],
            "--baseline",
            gpt["dense"],
            "--max-length",
            "32",
            "--stride",
            "16",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    assert "perplexity" in out and "ratio" in out
    result = json.loads(out_json.read_text())
    _check_schema(result, "text-generation", baseline=True)
    assert result["model"]["compressed"] and not result["baseline"]["compressed"]
    # 300 tokens, windows of 32 every 16: every token after the first is scored exactly once
    assert result["model"]["metrics"]["tokens"] == 299 == result["baseline"]["metrics"]["tokens"]
    assert result["ratios"]["parameters"] < 1 and result["ratios"]["bytes_on_disk"] < 1
    assert math.isfinite(result["ratios"]["perplexity"])
    assert result["settings"]["max_length"] == 32 and result["settings"]["stride"] == 16


def test_image_classification_cli_self_baseline(vit, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _cli(
        [
            vit["svd"],
            "--task",
            "image-classification",
            "--data",
            vit["images"],
            "--baseline",
            vit["svd"],
            "--batch-size",
            "4",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    _check_schema(result, "image-classification", baseline=True)
    assert result["model"]["metrics"]["total"] == 9
    for key in ("accuracy", "correct", "total", "parameters", "bytes_on_disk", "model_memory_bytes"):
        assert result["ratios"][key] in (1.0, None), key
    assert result["model"]["metrics"]["accuracy"] == result["baseline"]["metrics"]["accuracy"]


def test_translation_cli_bleu_of_own_outputs_is_100(marian, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = _cli(
        [
            marian["dense"],
            "--task",
            "translation",
            "--data",
            marian["src"],
            "--references",
            marian["ref"],
            "--baseline",
            marian["dense"],
            "--num-beams",
            "1",
            "--max-new-tokens",
            "6",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    assert "BLEU" in out and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in out  # signature shown
    result = json.loads(out_json.read_text())
    _check_schema(result, "translation", baseline=True)
    metrics = result["model"]["metrics"]
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    assert metrics["sentences"] == 5
    for key in ("bleu", "chrf", "sentences", "parameters", "bytes_on_disk"):
        assert result["ratios"][key] == pytest.approx(1.0), key


def test_a_translator_tokenizer_without_a_pad_token_is_refused_in_one_line(marian, tmp_path, capsys):
    """svdlora eval of a translator whose tokenizer has no pad token ended as 'internal error ValueError: Asking to
    pad but the tokenizer does not have a padding token ... a bug in svdlora': refused as calibration refuses it,
    before the load (compress --eval: before compressing), and by the run where the tokenizer is known only then."""
    import copy

    from svdlora.evaluation.options import EvalOptions
    from svdlora.evaluation.translation import evaluate_translation

    tok = word_tokenizer(WORDS, eos_suffix=True)
    unpadded = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer), eos_token="</s>")
    unpadded.backend_tokenizer.no_padding()
    folder = tmp_path / "unpadded"
    tiny_marian(len(tok)).save_pretrained(folder)
    unpadded.save_pretrained(folder)
    said = "translation: the tokenizer has no pad token, which batching the source sentences needs: set one "
    said += "(tokenizer.pad_token = ..., the model pads with id 0)"
    code, _, err = _cli([str(folder), "--data", marian["src"], "--references", marian["ref"]], capsys)
    assert code == 2 and said in err and "a bug" not in err, err
    svd = tmp_path / "svd"
    flags = ["--budget", "0.5", "--calibration", "none", "--eval", marian["src"], "--references", marian["ref"]]
    assert main(["compress", str(folder), "-o", str(svd), *flags, "--no-progress"]) == 2
    assert said in capsys.readouterr().err and not svd.exists()
    opts = EvalOptions(task="translation", data=marian["sources"], max_new_tokens=6, progress=False)
    with pytest.raises(svdlora.SvdloraError) as refused:  # a hub id's tokenizer: known once the model is loaded
        evaluate_translation(tiny_marian(len(tok)), unpadded, (marian["sources"], marian["references"]), opts)
    assert said in str(refused.value)


def test_translation_compressed_model_runs_with_beam_search(marian):
    result = evaluate(
        marian["svd"],
        task="translation",
        data=marian["src"],
        references=marian["ref"],
        num_beams=2,
        max_new_tokens=6,
        batch_size=2,
        device="cpu",
        progress=False,
    )
    _check_schema(result, "translation", baseline=False)
    table = format_table(result)
    assert "BLEU" in table and "ratio" not in table  # no baseline: one column
    assert result["model"]["compressed"] and 0 <= result["model"]["metrics"]["bleu"] <= 100 + 1e-9
    assert result["settings"]["num_beams"] == 2


def test_translation_list_column_is_scored_as_several_references(marian):
    """A target column of reference lists (several references per sentence) was scored against its str(),
    brackets and quotes included; a dict or None was translated / scored as "{'de': ...}" / "None"."""
    import datasets
    import sacrebleu

    wrong = ["x y z"] * len(marian["sources"])  # a second reference that matches nothing
    lists = [[ref, other] for ref, other in zip(marian["references"], wrong, strict=True)]
    lists[0] = lists[0][:1]  # a sentence with fewer references
    pairs = datasets.Dataset.from_dict({"source": marian["sources"], "target": lists})
    opts = {"num_beams": 1, "max_new_tokens": 6, "device": "cpu", "progress": False}
    metrics = evaluate(marian["dense"], task="translation", data=pairs, **opts)["model"]["metrics"]
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    streams = [marian["references"], [None, *wrong[1:]]]
    expected = sacrebleu.corpus_bleu(marian["references"], streams).score
    assert metrics["bleu"] == pytest.approx(expected)

    nested = datasets.Dataset.from_dict({"translation": [{"de": s} for s in marian["sources"]], "target": lists})
    with pytest.raises(
        svdlora.SvdloraError, match=r"column 'translation', which holds a dict .*--source-column translation\.<key>"
    ):
        evaluate(marian["dense"], task="translation", data=nested, source_column="translation", **opts)
    missing = datasets.Dataset.from_dict({"source": marian["sources"], "target": [None, *marian["references"][1:]]})
    with pytest.raises(svdlora.SvdloraError, match=r"column 'target', which holds None \(row 0\)"):
        evaluate(marian["dense"], task="translation", data=missing, **opts)


def test_a_left_padding_tokenizer_translates_each_sentence_as_it_would_alone():
    """Batches were padded on the tokenizer's side: one saved with padding_side='left' shifted a shorter
    sentence's absolute encoder positions (Marian's) by its batch's longest, so its translation, and BLEU,
    depended on the batch size. They are padded on the right."""
    from svdlora.evaluation.options import EvalOptions
    from svdlora.evaluation.translation import translate

    tok = word_tokenizer(WORDS, eos_suffix=True)
    tok.padding_side = "left"
    model = tiny_marian(len(tok))
    with torch.no_grad():  # sharper than the seeded init: the outputs then follow the positions
        for p in model.parameters():
            p.mul_(8)
        model.final_logits_bias.zero_()
    sources = ["ein mann sitzt", "der hund läuft im park", "eine katze", "rot blau haus baum", "klein"]
    hypotheses = {}
    for batch_size in (1, 16):
        opts = EvalOptions(task="translation", data=sources, max_new_tokens=8, batch_size=batch_size, progress=False)
        hypotheses[batch_size] = translate(model, tok, sources, opts)[0]
    assert hypotheses[16] == hypotheses[1]


# ------------------------------------------------------------------ perplexity by hand
def _ids(tok, text):
    return tok(text, return_tensors="pt")["input_ids"][0]


def _hand_perplexity(model, ids, max_length, stride):
    """The HF guide's loop, with every target's −log p summed one by one from log_softmax."""
    nll, count, seen, prev_end = 0.0, 0, [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[begin:end][None]).logits[0].double(), dim=-1)
        for t in range(end - trg_len, end):
            if t == begin:
                continue  # no context in this window: the text's first token, or stride == max_length
            nll -= logp[t - begin - 1, ids[t]].item()
            count += 1
            seen.append(t)
        prev_end = end
        if end == len(ids):
            break
    assert len(set(seen)) == len(seen)  # no token scored twice
    return math.exp(nll / count), count


def test_perplexity_single_window_equals_hand_computation(gpt):
    model = GPT2LMHeadModel.from_pretrained(gpt["dense"]).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(gpt["dense"])
    text = " ".join(TEXT.split()[:20])
    ids = _ids(tok, text)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    expected = math.exp(-sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1))
    data = _write(gpt["root"] / "short.txt", text)
    result = evaluate((model, tok), task="text-generation", data=data, max_length=64, progress=False)
    metrics = result["model"]["metrics"]
    assert metrics["windows"] == 1 and metrics["tokens"] == len(ids) - 1
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_length,stride,batch_size", [(8, 3, 1), (16, 16, 1), (10, 4, 3)])
def test_perplexity_strided_windows_equal_hand_computation(gpt, max_length, stride, batch_size):
    model = GPT2LMHeadModel.from_pretrained(gpt["dense"]).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(gpt["dense"])
    text = " ".join(TEXT.split()[:41])
    expected, count = _hand_perplexity(model, _ids(tok, text), max_length, stride)
    result = evaluate(
        model,
        task="text-generation",
        data=_write(gpt["root"] / f"s{max_length}.txt", text),
        processor=tok,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        progress=False,
    )
    metrics = result["model"]["metrics"]
    # overlapping windows score every token but the first; windows that do not overlap lose
    # the first token of each window (41 tokens in windows of 16: 3 windows)
    assert metrics["tokens"] == count == (40 if stride < max_length else 38)
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["model"]["name"].endswith("(in memory)") and result["model"]["bytes_on_disk"] is None


def test_in_memory_compressed_llama_and_task_check(gpt):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    tok = PreTrainedTokenizerFast.from_pretrained(gpt["dense"])
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    dense = evaluate(model, "text-generation", gpt["text"], processor=tok, max_length=32, progress=False)
    svdlora.compress(model, budget=0.5, progress=False)  # in place, never saved
    result = evaluate(model, "text-generation", gpt["text"], processor=tok, max_length=32, progress=False)
    assert result["model"]["compressed"] and not dense["model"]["compressed"]
    assert result["model"]["parameters"] < dense["model"]["parameters"]
    assert result["model"]["metrics"]["tokens"] == dense["model"]["metrics"]["tokens"] == 299

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=len(tok)))  # fmt: skip
    with pytest.raises(svdlora.SvdloraError, match="needs a causal language model.*BertForMaskedLM"):
        evaluate(bert, "text-generation", gpt["text"], processor=tok)


def test_sliding_windows_cover_every_token_once():
    for seq_len, length, stride in [(1000, 64, 32), (65, 64, 32), (10, 64, 32), (100, 7, 7), (100, 9, 2)]:
        windows = sliding_windows(seq_len, length, stride)
        spans = [t for w in windows for t in range(w.end - w.targets, w.end)]
        assert spans == list(range(seq_len))
        assert all(w.length <= length for w in windows)


def test_class_names_match_model_labels_by_name(vit):
    model = ViTForImageClassification.from_pretrained(vit["dense"])  # labels bird, cat, dog
    assert label_ids(["Dog", "cat", " BIRD "], model).tolist() == [2, 1, 0]
    assert label_ids([2, 0], model).tolist() == [2, 0]  # integer labels are model ids
    with pytest.raises(svdlora.SvdloraError, match="label ids \\[7\\]"):
        label_ids([0, 7], model, "ds")


def test_a_class_name_the_model_gives_twice_is_not_mapped_to_the_last(vit):
    """ImageNet's labels name two classes "crane" (134: the bird, 517: the machine): a class "crane" of the data
    was scored against the last of them, so every crane bird counted wrong."""
    import datasets

    model = ViTForImageClassification.from_pretrained(vit["dense"])
    model.config.id2label = {0: "crane", 1: "cat", 2: "crane"}
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))  # predicts class 0 for every image
    processor = ViTImageProcessor.from_pretrained(vit["dense"])
    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["crane", "cat"])})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 0]}, features=feats)
    opts = {"device": "cpu", "progress": False, "batch_size": 3}
    result = evaluate((model, processor), task="image-classification", data=data, **opts)
    assert result["model"]["metrics"]["correct"] == 3  # the dataset's id 0 is the model's crane 0
    # a class name alone (a folder's, or a class id the model gives another label) cannot say which crane
    with pytest.raises(svdlora.SvdloraError, match=r"'crane' names the model's labels \[0, 2\]"):
        label_ids(["cat", "crane"], model, "ds")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "crane"])})
    other = datasets.Dataset.from_dict({"image": images[:2], "label": [0, 1]}, features=feats)
    with pytest.raises(svdlora.SvdloraError, match=r"'crane' names the model's labels \[0, 2\]"):
        evaluate((model, processor), task="image-classification", data=other, **opts)


def test_a_dict_columns_key_names_the_text_and_the_labels(gpt, vit):
    """--text-column / --label-column 'doc.text' passed the column check (which takes a dict column's key, as the
    translation columns do) and then crashed: ValueError: Column 'doc.text' doesn't exist."""
    import datasets

    opts = {"max_length": 32, "device": "cpu", "progress": False}
    plain = evaluate(gpt["dense"], task="text-generation", data=datasets.Dataset.from_dict({"text": [TEXT]}), **opts)
    nested = datasets.Dataset.from_dict({"doc": [{"text": TEXT}]})
    keyed = evaluate(gpt["dense"], task="text-generation", data=nested, text_column="doc.text", **opts)
    assert keyed["model"]["metrics"] == plain["model"]["metrics"]

    images = [Image.new("RGB", (16, 16)) for _ in CLASSES]
    data = datasets.Dataset.from_dict({"image": images, "meta": [{"label": name} for name in CLASSES]})
    result = evaluate(vit["dense"], task="image-classification", data=data, label_column="meta.label", device="cpu")
    assert result["model"]["metrics"]["total"] == len(CLASSES)
    features = datasets.Features({"sample": {"img": datasets.Image()}, "label": datasets.Value("string")})
    nested = datasets.Dataset.from_dict({"sample": [{"img": im} for im in images], "label": list(CLASSES)}, features)
    by_key = evaluate(vit["dense"], task="image-classification", data=nested, image_column="sample.img", device="cpu")
    assert by_key["model"]["metrics"] == result["model"]["metrics"]  # was KeyError 'sample.img' in the batches


def test_a_split_of_a_dataset_that_is_one_split_is_refused(gpt, tmp_path):
    """--split on a Dataset in memory (or a save_to_disk of one split) was ignored, and the result named the
    split given as the one read."""
    import datasets

    opts = {"task": "text-generation", "max_length": 32, "device": "cpu", "progress": False}
    one = datasets.Dataset.from_dict({"text": [TEXT]})
    with pytest.raises(svdlora.SvdloraError, match="--split 'validation': --data is one split of a dataset"):
        evaluate(gpt["dense"], data=one, split="validation", **opts)
    one.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(svdlora.SvdloraError, match="--split 'validation': --data is one split"):
        evaluate(gpt["dense"], data=str(tmp_path / "saved"), split="validation", **opts)
    both = datasets.DatasetDict({"train": one, "validation": one})  # a set of splits: the split is read
    assert evaluate(gpt["dense"], data=both, split="validation", **opts)["data"]["split"] == "validation"


def test_data_read_once_is_named_by_the_split_it_read(gpt, tmp_path):
    """compress --eval passed the data its checks had read to evaluate, which then named no split (the read had
    chosen 'test' on options evaluate never saw): the result said split None where a read of its own said test."""
    import datasets

    from svdlora.evaluation import read_data

    one = datasets.Dataset.from_dict({"text": [TEXT]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "ds"))
    opts = {"max_length": 32, "device": "cpu", "progress": False}
    data = str(tmp_path / "ds")
    own = evaluate(gpt["dense"], task="text-generation", data=data, **opts)
    read = read_data("text-generation", data, opts)
    given = evaluate(gpt["dense"], task="text-generation", data=data, data_read=read, **opts)
    assert own["data"] == given["data"] and given["data"]["split"] == "test"
    assert own["model"]["metrics"] == given["model"]["metrics"]


def test_limit_counts_windows_and_images(gpt, vit):
    text = evaluate(
        gpt["dense"], task="text-generation", data=gpt["text"], limit=3, max_length=32, device="cpu", progress=False
    )
    assert text["model"]["metrics"]["windows"] == 3 == text["data"]["examples"]
    images = evaluate(
        vit["dense"], task="image-classification", data=vit["images"], limit=4, device="cpu", progress=False
    )
    assert images["model"]["metrics"]["total"] == 4


def test_datasets_sources(gpt, vit, marian, tmp_path):
    import datasets

    text_ds = datasets.Dataset.from_dict({"text": [TEXT[:400], TEXT[400:800]]})
    text_ds.save_to_disk(str(tmp_path / "text_ds"))
    r = evaluate(
        gpt["dense"],
        task="text-generation",
        data=str(tmp_path / "text_ds"),
        max_length=32,
        device="cpu",
        progress=False,
    )
    assert r["model"]["metrics"]["tokens"] > 0

    pairs = datasets.Dataset.from_dict(
        {"translation": [{"de": s, "en": t} for s, t in zip(marian["sources"], marian["references"], strict=True)]}
    )
    pairs = datasets.DatasetDict({"test": pairs})
    pairs.save_to_disk(str(tmp_path / "mt_ds"))
    r = evaluate(
        marian["dense"],
        task="translation",
        data=str(tmp_path / "mt_ds"),  # no split given: "test" is read, and the result names it
        source_column="translation.de",
        target_column="translation.en",
        num_beams=1,
        max_new_tokens=6,
        device="cpu",
        progress=False,
    )
    assert r["model"]["metrics"]["bleu"] == pytest.approx(100.0) and r["data"]["split"] == "test"

    images = [Image.open(p).convert("RGB") for p in sorted((vit["root"] / "images" / "dog").iterdir())]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["Dog", "Cat"])})
    image_ds = datasets.Dataset.from_dict({"image": images, "label": [0] * len(images)}, features=feats)
    r = evaluate(vit["dense"], task="image-classification", data=image_ds, device="cpu", progress=False)
    assert r["model"]["metrics"]["total"] == 3 and r["data"]["source"].startswith("<in-memory")


# ------------------------------------------------------------------ bad inputs
def _error(args, capsys) -> str:
    code, out, err = _cli(args, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("svdlora eval: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_data_path(gpt, capsys):
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", "no/such/wiki.test.txt"], capsys)
    assert "--data 'no/such/wiki.test.txt' does not exist" in msg


def test_a_missing_path_is_said_as_such_without_datasets(monkeypatch, tmp_path):
    """Seen on a GPU machine without `datasets`: a typo'd path was answered 'pip install datasets'."""
    from svdlora.evaluation.sources import open_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(svdlora.SvdloraError, match="does not exist"):
        open_dataset("no/such/wiki.test.txt", None, None)
    with pytest.raises(svdlora.SvdloraError, match="needs the `datasets` package"):
        open_dataset(str(tmp_path), None, None)


def test_missing_image_folder_that_could_be_a_hub_name(vit, capsys):
    msg = _error([vit["dense"], "--task", "image-classification", "--data", "cifar10/nope"], capsys)
    assert "'cifar10/nope' does not exist" in msg


def test_image_classes_that_are_not_model_labels(vit, tmp_path, capsys):
    for name in ("cat", "zebra"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name / "0.png")
    msg = _error([vit["dense"], "--task", "image-classification", "--data", str(tmp_path)], capsys)
    assert "['zebra']" in msg and "'bird'" in msg and "not labels of the model" in msg


def test_image_folder_without_class_folders(vit, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    msg = _error([vit["dense"], "--task", "image-classification", "--data", str(tmp_path)], capsys)
    assert "no class subfolders" in msg


def test_data_of_the_wrong_kind_for_the_task_says_so(gpt, vit, marian, capsys):
    # an image folder given to a text task: was "--text-column 'text' is not a column of the dataset"
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", vit["images"]], capsys)
    assert f"--data {vit['images']!r} is an image folder, but text-generation needs a text file" in msg
    assert "--task image-classification" in msg
    flat = str(Path(vit["images"]) / "cat")  # images without class subfolders
    assert "is an image folder" in _error([gpt["dense"], "--task", "text-generation", "--data", flat], capsys)
    for extra in ([], ["--references", marian["ref"]]):  # was a --source-column error / "is a folder"
        msg = _error([marian["dense"], "--task", "translation", "--data", vit["images"], *extra], capsys)
        assert "is an image folder, but translation needs a source-sentence file" in msg
        assert "--task image-classification" in msg
    # the mirror cases already said what was given and what the task needs
    msg = _error([vit["dense"], "--task", "image-classification", "--data", gpt["text"]], capsys)
    assert "is a file: image-classification reads a folder with one subfolder per class" in msg
    msg = _error([marian["dense"], "--task", "translation", "--data", marian["src"]], capsys)
    assert f"translation from the text file {marian['src']!r} needs --references FILE" in msg


def test_dataset_options_with_plain_data_are_refused(gpt, vit, marian, capsys):
    """--split, --data-config and the column flags read a dataset; with a plain text file, sentence
    file or image folder they would be ignored without a word: refused, naming them."""
    msg = _error([gpt["dense"], "--data", gpt["text"], "--split", "test"], capsys)
    want = f"--split applies to datasets, and --data {gpt['text']!r} is a plain text file, read whole: drop it"
    assert msg.endswith(want), msg
    msg = _error([gpt["dense"], "--data", gpt["text"], "--data-config", "x", "--text-column", "body"], capsys)
    assert "--data-config and --text-column apply to datasets" in msg and msg.endswith("drop them")
    msg = _error([vit["dense"], "--data", vit["images"], "--label-column", "fine_label"], capsys)
    assert f"--label-column applies to datasets, and --data {vit['images']!r} is an image folder" in msg
    argv = [marian["dense"], "--data", marian["src"], "--references", marian["ref"], "--source-column", "de"]
    assert "--source-column applies to datasets" in _error(argv, capsys)


def test_the_dataset_configuration_read_is_named_in_the_result_and_the_table(gpt, tmp_path, capsys):
    """--data-config picks other data under the same dataset name (wikitext-2-raw-v1 or wikitext-2-v1), and
    the result named only the source and split: two configurations' different perplexities read as one data's."""
    from svdlora import card

    configs = {"one": TEXT, "two": " ".join(reversed(TEXT.split()))}
    yaml = ["---", "configs:"]
    for name, text in configs.items():
        (tmp_path / "ds" / name).mkdir(parents=True)
        (tmp_path / "ds" / name / "test.jsonl").write_text(json.dumps({"text": text}) + "\n")
        yaml += [f"- config_name: {name}", "  data_files:", "  - split: test", f"    path: {name}/test.jsonl"]
    (tmp_path / "ds" / "README.md").write_text("\n".join([*yaml, "---", ""]))
    perplexities = set()
    for name in configs:
        out_json = tmp_path / f"{name}.json"
        args = [gpt["dense"], "--data", str(tmp_path / "ds"), "--data-config", name, "--json", str(out_json)]
        code, out, err = _cli(args, capsys)
        assert code == 0, err
        result = json.loads(out_json.read_text())
        assert result["data"]["config"] == name
        assert out.startswith(f"text-generation on {tmp_path / 'ds'} ({name}) [test]: "), out.splitlines()[0]
        text = card.render("t", None, [], tags=[], library="transformers", eval_result=result)  # compress --eval's
        assert f"on `{tmp_path / 'ds'}` ({name}) [test] ({result['data']['examples']} examples" in text
        perplexities.add(result["model"]["metrics"]["perplexity"])
    assert len(perplexities) == 2  # other data indeed


def test_image_dataset_folder_with_split_is_read_as_a_dataset(vit, tmp_path, capsys):
    """A folder that is not one of class subfolders (a hub image dataset's copy: data/<split>.parquet)
    given with --split is read by ``datasets``, with the split; a class-subfolder image folder given
    --split is refused, since it would ignore it; a model folder as --data says so for this task too."""
    import datasets

    images = datasets.load_dataset("imagefolder", data_dir=vit["images"], split="train")
    (tmp_path / "data").mkdir()
    images.to_parquet(str(tmp_path / "data" / "test-00000.parquet"))
    code, out, err = _cli(
        [vit["dense"], "--task", "image-classification", "--data", str(tmp_path), "--split", "test"], capsys
    )
    assert code == 0, err
    assert "accuracy" in out
    msg = _error([vit["dense"], "--data", vit["images"], "--split", "test"], capsys)
    assert "--split applies to datasets" in msg and "is an image folder" in msg
    msg = _error([vit["dense"], "--task", "image-classification", "--data", vit["dense"]], capsys)
    assert f"--data {vit['dense']!r} is a model folder (config.json), not data" in msg


def test_model_folder_given_as_data(gpt, marian, capsys):
    # was: "... nor a dataset folder: An error occurred while generating the dataset"
    for model, data in ((gpt["dense"], gpt["svd"]), (marian["dense"], marian["dense"])):
        msg = _error([model, "--data", data], capsys)
        assert f"--data {data!r} is a model folder (config.json), not data: pass models as MODEL" in msg


def test_model_folder_without_tokenizer_files(gpt, tmp_path, capsys):
    """transformers 5 builds an empty tokenizer from such a folder: perplexity said the text was 0 tokens."""
    GPT2LMHeadModel.from_pretrained(gpt["dense"]).save_pretrained(tmp_path / "no-tokenizer")
    assert main(["eval", str(tmp_path / "no-tokenizer"), "--data", str(gpt["text"]), "--no-progress"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_a_folder_without_tokenizer_files_is_refused_before_loading(gpt, tmp_path, capsys, monkeypatch):
    """eval loaded the whole model (minutes for a 7B one) before noticing its folder had no tokenizer, which
    compress --calibration and sweep refuse at once; a wrong --task still names the task that fits."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    GPT2LMHeadModel.from_pretrained(gpt["dense"]).save_pretrained(tmp_path / "no-tokenizer")
    capsys.readouterr()
    monkeypatch.setattr("svdlora.models.load_model", never)
    argv = ["eval", str(tmp_path / "no-tokenizer"), "--data", str(gpt["text"]), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load the tokenizer" in err[0] and "no tokenizer files" in err[0], err
    assert "; in Python, a model in memory can be passed as (model, tokenizer)" in err[0]  # no CLI flag does that
    assert main([*argv, "--task", "translation", "--references", str(gpt["text"])]) == 2
    assert "use --task text-generation" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["dense", "svd"])
def test_a_text_too_short_to_score_is_refused_before_the_model_is_loaded(gpt, tmp_path, capsys, monkeypatch, model):
    """eval of data whose every row is 1 token (one row here) loaded the model (minutes for a 7B one) before the
    perplexity said 'the text is 1 token(s) long'; the tokenizer read before the load refuses it now, as compress
    --eval does."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before its text was checked")

    monkeypatch.setattr("svdlora.models.load_model", never)
    (tmp_path / "one.json").write_text(json.dumps({"text": "the"}) + "\n")
    code, _, err = _cli([gpt[model], "--data", str(tmp_path / "one.json"), "--baseline", gpt["dense"]], capsys)
    assert code == 2 and "the text is 1 token(s) long" in err, err


@pytest.mark.parametrize("role", ["MODEL", "--baseline"])
def test_a_config_that_builds_no_model_is_one_clean_error(gpt, tmp_path, capsys, role):
    """Without --task (or as --baseline) the folder's model is built on the meta device first, and transformers'
    ValueError for a config it cannot build (heads that do not divide the width, a config class AutoModel has no
    model for) escaped as an internal error; it is a refusal naming the folder and what to fix."""
    folder = tmp_path / "bad"
    shutil.copytree(gpt["dense"], folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "n_head": 3}))  # 32 wide: GPT-2 refuses to build it
    args = [str(folder)] if role == "MODEL" else [gpt["dense"], "--baseline", str(folder)]
    code, _, err = _cli([*args, "--data", gpt["text"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{role} {str(folder)!r}: its config.json builds no " in err and "fix config.json" in err, err


def test_checked_processor_is_the_public_checked_loader(gpt, tmp_path):
    """calibration, sweep, streaming and the card's eval import it by this name (was the private _load_processor)."""
    from svdlora.evaluation.loading import checked_processor

    assert checked_processor(gpt["dense"], "text-generation").get_vocab()
    GPT2LMHeadModel.from_pretrained(gpt["dense"]).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(svdlora.SvdloraError, match="cannot load the tokenizer of .*no tokenizer files"):
        checked_processor(str(tmp_path / "no-tokenizer"), "text-generation")


def test_a_baseline_with_another_tokenizer_is_flagged(gpt, caplog):
    """Perplexities over different tokens were divided into ratios without a word (e.g. --baseline gpt2
    copied from the README for a compressed SmolLM2)."""
    other = word_tokenizer(WORDS[::-1])
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(other)))
    options = {"data": gpt["text"], "limit": 1, "max_length": 32, "progress": False}
    svdlora.evaluate(gpt["svd"], baseline=gpt["dense"], **options)
    assert "another tokenizer" not in caplog.text
    svdlora.evaluate(gpt["svd"], baseline=(model, other), **options)
    assert "the baseline GPT2LMHeadModel (in memory) has another tokenizer than the model" in caplog.text


def test_folder_of_text_files_is_still_text(gpt, tmp_path, capsys):
    (tmp_path / "part.txt").write_text(TEXT)
    code, out, err = _cli([gpt["dense"], "--task", "text-generation", "--data", str(tmp_path), "--limit", "1"], capsys)
    assert code == 0, err
    assert "perplexity" in out


def test_dataset_folder_with_pictures_beside_its_data_is_still_text(gpt, tmp_path, capsys):
    """A hub dataset's snapshot: README, an assets/ folder of pictures, and its data two levels down
    (data/<split>/*.jsonl). ``datasets`` reads it as text; it is not an image folder."""
    (tmp_path / "assets").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "assets" / "logo.png")
    (tmp_path / "README.md").write_text("a dataset card")
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test" / "part.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    code, out, err = _cli([gpt["dense"], "--task", "text-generation", "--data", str(tmp_path), "--limit", "1"], capsys)
    assert code == 0, err
    assert "perplexity" in out


def test_source_and_reference_line_counts_differ(marian, tmp_path, capsys):
    (tmp_path / "ref.txt").write_text("one\ntwo\n")
    msg = _error(
        [marian["dense"], "--task", "translation", "--data", marian["src"], "--references", str(tmp_path / "ref.txt")],
        capsys,
    )
    assert "has 5 lines" in msg and "has 2" in msg


def test_empty_files(gpt, marian, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", str(tmp_path / "empty.txt")], capsys)
    assert "is empty" in msg
    msg = _error(
        [
            marian["dense"],
            "--task",
            "translation",
            "--data",
            str(tmp_path / "empty.txt"),
            "--references",
            marian["ref"],
        ],
        capsys,
    )
    assert "--data" in msg and "is empty" in msg


def test_task_that_does_not_fit_the_model(gpt, vit, marian, capsys):
    msg = _error(
        [vit["dense"], "--task", "translation", "--data", marian["src"], "--references", marian["ref"]], capsys
    )
    assert "--task translation needs an encoder-decoder" in msg and "use --task image-classification" in msg
    msg = _error([marian["svd"], "--task", "text-generation", "--data", gpt["text"]], capsys)
    assert "use --task translation" in msg
    msg = _error([gpt["dense"], "--task", "image-classification", "--data", vit["images"]], capsys)
    assert "use --task text-generation" in msg


def test_a_speech_encoder_decoder_is_refused_for_translation_in_one_line(marian, tmp_path, capsys):
    """Whisper generates from audio features, but as an encoder-decoder that generates it was taken for a translator
    (by default and with --task translation): eval fed it text and ended as 'internal error ValueError: Make sure to
    provide either `input_features` or `encoder_outputs` to `generate` ... a bug in svdlora' (exit 1)."""
    tok = word_tokenizer(WORDS, eos_suffix=True)
    tiny_whisper(len(tok)).save_pretrained(tmp_path / "whisper")
    tok.save_pretrained(tmp_path / "whisper")
    data = ["--data", marian["src"], "--references", marian["ref"]]
    msg = _error([str(tmp_path / "whisper"), "--task", "translation", *data], capsys)
    assert "--task translation needs an encoder-decoder model that generates" in msg, msg
    assert msg.endswith("is a WhisperForConditionalGeneration"), msg
    assert "is a WhisperForConditionalGeneration, and svdlora eval measures" in _error(
        [str(tmp_path / "whisper"), *data], capsys
    )


def test_a_model_no_task_fits_is_refused_without_asking_for_a_task(marian, tmp_path, capsys):
    """A BERT classifier's folder without --task was refused with 'cannot tell which task ... pass --task
    (text-generation, image-classification, translation)', each of which then refused it in turn."""
    from .conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "bert")
    msg = _error([str(tmp_path / "bert"), "--data", marian["src"]], capsys)
    assert "bert' is a BertForSequenceClassification, and svdlora eval measures causal LMs" in msg, msg
    assert "pass --task" not in msg


def test_max_new_tokens_not_given_is_fitted_to_the_decoder_positions_and_refused_past_them_when_given(
    marian, tmp_path, capsys
):
    """svdlora eval refused its own --max-new-tokens default (128) for a translator of 64 decoder positions ('pass
    --max-new-tokens 64'), where compress --eval and sweep fitted it: not given, both models now generate up to
    their positions; a value given past them is still refused."""
    args = [marian["svd"], "--task", "translation", "--data", marian["src"], "--references", marian["ref"]]
    code, out, err = _cli([*args, "--baseline", marian["dense"], "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["max_new_tokens"] == 64
    assert "<= 64 new tokens" in out
    msg = _error([*args, "--max-new-tokens", "128"], capsys)
    assert "--max-new-tokens 128 reaches past the model's 64 decoder positions: pass --max-new-tokens 64" in msg


def test_bad_options(gpt, capsys):
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", gpt["text"], "--max-length", "999"], capsys)
    assert "exceeds the model's context of 64" in msg
    msg = _error(
        [gpt["dense"], "--task", "text-generation", "--data", gpt["text"], "--max-length", "8", "--stride", "9"], capsys
    )
    assert "stride must be <= max_length" in msg
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", gpt["text"], "--max-length", "1"], capsys)
    assert "max_length must be >= 2 for text" in msg  # a one-token window scores nothing (was a ZeroDivisionError)
    missing = str(Path(gpt["dense"]).parent / "no-such-model")
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", gpt["text"], "--baseline", missing], capsys)
    assert "does not exist: check the path" in msg and "Repo id" not in msg
    with pytest.raises(svdlora.SvdloraError, match="unknown evaluate"):
        evaluate(gpt["dense"], task="text-generation", data=gpt["text"], beams=3)
    with pytest.raises(svdlora.SvdloraError, match="task must be one of"):
        evaluate(gpt["dense"], task="summarization", data=gpt["text"])
    # another task's settings were ignored without a word (only --references was refused)
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", gpt["text"], "--num-beams", "2"], capsys)
    assert "num_beams is only used by --task translation, got it with --task text-generation" in msg
    with pytest.raises(svdlora.SvdloraError, match="max_length is only used by --task text-generation"):
        evaluate(gpt["dense"], task="image-classification", data=gpt["text"], max_length=16)


@pytest.mark.parametrize(("flag", "name"), [("--num-beams", "num_beams"), ("--max-new-tokens", "max_new_tokens")])
def test_a_translation_setting_given_at_its_default_value_is_refused_for_text(gpt, capsys, flag, name):
    """`--num-beams 4` (or `--max-new-tokens 128`, translation's defaults) with text-generation was taken for
    not given and ignored in silence, where any other value is refused: the whole text was then evaluated."""
    value = {"num_beams": "4", "max_new_tokens": "128"}[name]
    msg = _error([gpt["dense"], "--task", "text-generation", "--data", gpt["text"], flag, value], capsys)
    assert f"{name} is only used by --task translation, got it with --task text-generation: drop {flag}" in msg
    with pytest.raises(svdlora.SvdloraError, match=f"{name} is only used by --task translation"):
        evaluate(gpt["dense"], task="text-generation", data=gpt["text"], **{name: int(value)})


def test_the_text_column_given_at_its_default_name_is_refused_for_images(vit, capsys):
    """`--text-column text` (its default name) with an image task was taken for not given and ignored in silence,
    where any other name is refused, as --num-beams 4 was with text."""
    args = [vit["dense"], "--task", "image-classification", "--data", vit["images"], "--text-column", "text"]
    msg = _error(args, capsys)
    assert "text_column is only used by --task text-generation" in msg and msg.endswith("drop --text-column"), msg


def test_a_hub_id_that_cannot_be_fetched_is_refused_as_compress_refuses_it(gpt, capsys):
    """Offline, `eval --baseline gpt2` said "cannot read its config (We couldn't connect to 'https://huggingface.co'
    ...)", where compress says the id is not in the cache and that HF_HUB_OFFLINE must be unset."""
    args = [gpt["svd"], "--task", "text-generation", "--data", gpt["text"], "--baseline", "no-such-org/no-such-model"]
    msg = _error(args, capsys)
    assert msg.startswith("svdlora eval: error: --baseline 'no-such-org/no-such-model': ") and "couldn't" not in msg
    assert "neither a local folder nor downloadable from the Hugging Face hub" in msg and "HF_HUB_OFFLINE" in msg


def test_a_model_whose_config_names_no_architecture_gets_the_task_error(gpt, tmp_path, capsys):
    """Without "architectures" the model is an AutoModel (no LM head): the baseline's context check built
    its meta model as AutoModel(config), which raises, before the one line that names the task."""
    GPT2LMHeadModel.from_pretrained(gpt["dense"]).save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    args = [tmp_path / "bare", "--task", "text-generation", "--data", gpt["text"], "--baseline", gpt["dense"]]
    msg = _error([str(a) for a in [*args, "--device", "cpu"]], capsys)
    assert "needs a causal language model" in msg and "is a GPT2Model" in msg


def test_a_baseline_with_a_shorter_context_is_refused_before_the_first_evaluation(gpt, tmp_path, capsys, monkeypatch):
    """The baseline reads the model's windows: one of 64 tokens failed on a 32-token baseline only after
    the model's whole evaluation had run."""
    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    short = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tok)))
    short.save_pretrained(tmp_path / "short")
    tok.save_pretrained(tmp_path / "short")

    def never(*args, **kwargs):
        raise AssertionError("a model was evaluated before the baseline's context was checked")

    monkeypatch.setattr("svdlora.evaluation._measure", never)
    args = [gpt["svd"], "--data", gpt["text"], "--baseline", tmp_path / "short", "--device", "cpu"]
    msg = _error([str(a) for a in args], capsys)
    assert "--baseline's context is 32 tokens, shorter than the 64-token windows" in msg
    assert "pass --max-length 32" in msg


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_runtime_layouts_give_the_same_perplexity(gpt, tmp_path, capsys):
    figures = {}
    for runtime in ("factorized", "pairs", "merged", "auto"):
        out_json = tmp_path / f"{runtime}.json"
        args = [gpt["svd"], "--task", "text-generation", "--data", gpt["text"], "--max-length", "32"]
        code, out, err = _cli([*args, "--runtime", runtime, "--json", str(out_json)], capsys)
        assert code == 0, err
        assert f"runtime {runtime}" in out  # the table says which runtime ran
        assert json.loads(out_json.read_text())["settings"]["runtime"] == runtime
        figures[runtime] = json.loads(out_json.read_text())["model"]["metrics"]["perplexity"]
    assert figures["merged"] == pytest.approx(figures["factorized"], rel=1e-4)
    assert figures["auto"] == pytest.approx(figures["factorized"], rel=1e-4)
    assert figures["pairs"] == pytest.approx(figures["factorized"], rel=1e-4)


def test_a_runtime_is_refused_for_a_compressed_model_in_memory(gpt):
    """runtime= lays out svdlora folders as they load: a compressed model passed in memory ran as it was (its
    factors) while the result's settings said 'runtime merged'. Refused, as model or baseline."""
    from transformers import AutoTokenizer

    model, tok = svdlora.load_compressed(gpt["svd"]), AutoTokenizer.from_pretrained(gpt["svd"])
    options = {"task": "text-generation", "data": gpt["text"], "runtime": "merged", "progress": False}
    match = "runtime='merged' lays out svdlora folders as they load, and the compressed GPT2LMHeadModel is in memory"
    with pytest.raises(svdlora.SvdloraError, match=match):
        evaluate((model, tok), **options)
    with pytest.raises(svdlora.SvdloraError, match=match):
        evaluate(gpt["svd"], baseline=(model, tok), **options)


class _Packed(torch.Tensor):
    """A quantization library's weight: a wrapper tensor whose bytes live in its inner tensors."""

    @staticmethod
    def __new__(cls, data, scale):
        return torch.Tensor._make_wrapper_subclass(cls, (4, 8), dtype=torch.float32)

    def __init__(self, data, scale):
        self._data, self._scale = data, scale

    def __tensor_flatten__(self):
        return ["_data", "_scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_model_memory_counts_the_inner_tensors_of_wrapper_weights():
    from svdlora.evaluation.measure import model_memory_bytes

    layer = torch.nn.Linear(8, 4, bias=False)
    layer.register_buffer("packed", _Packed(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4)))
    assert model_memory_bytes(layer) == 8 * 4 * 4 + 16 + 4 * 4  # the float weight, packed data, scales


def test_task_defaults_to_the_one_the_model_fits(gpt, vit, marian, tmp_path, capsys):
    marian_args = [marian["svd"], "--data", marian["src"], "--references", marian["ref"], "--max-new-tokens", "6"]
    runs = [
        ([gpt["svd"], "--data", gpt["text"], "--max-length", "32"], "text-generation"),
        ([vit["dense"], "--data", vit["images"]], "image-classification"),
        (marian_args, "translation"),
    ]
    for args, task in runs:  # no --task
        code, _, err = _cli([*args, "--limit", "2", "--json", str(tmp_path / "r.json")], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "r.json").read_text())["task"] == task
    model = GPT2LMHeadModel.from_pretrained(gpt["dense"])  # in memory, with its tokenizer
    tokenizer = PreTrainedTokenizerFast.from_pretrained(gpt["dense"])
    result = svdlora.evaluate((model, tokenizer), data=gpt["text"], limit=1, max_length=32, progress=False)
    assert result["task"] == "text-generation"
    with pytest.raises(svdlora.SvdloraError, match="cannot tell which task 'Linear' is for: pass --task"):
        svdlora.evaluate(torch.nn.Linear(2, 2), data=gpt["text"])


def test_cuda_peak_memory_leaves_out_what_else_is_on_the_device(monkeypatch):
    # An in-memory model stays on the GPU while its baseline is measured (and the other way
    # round): the raw max_memory_allocated counted its weights into the other model's peak.
    from svdlora.evaluation.measure import PeakMemory, model_memory_bytes

    model = torch.nn.Linear(8, 4)
    weights, other, activations = model_memory_bytes(model), 10_000_000, 512
    allocated = {"now": weights + other, "peak": weights + other}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    with PeakMemory(torch.device("cuda", 0), model) as peak:
        allocated["peak"] += activations
    assert peak.bytes == weights + activations


def test_unlabeled_examples_of_a_class_label_column_are_refused(vit):
    # Test splits often carry label -1 (no label) in a ClassLabel column: names[-1] made every
    # such image the last class, and the accuracy the share of images predicted as that class.
    import datasets

    model = ViTForImageClassification.from_pretrained(vit["dense"])
    processor = ViTImageProcessor.from_pretrained(vit["dense"])
    images = [Image.open(p).convert("RGB") for p in sorted(Path(vit["images"]).rglob("*.png"))]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    unlabeled = datasets.Dataset.from_dict({"image": images, "label": [-1] * len(images)}, features=feats)
    with pytest.raises(svdlora.SvdloraError, match=r"label column 'label' holds ids \[-1\].*unlabeled"):
        evaluate((model, processor), "image-classification", unlabeled, progress=False)


def test_image_processor_without_torchvision_loads_the_class_the_folder_names(monkeypatch, vit):
    """transformers 5.17 refuses AutoImageProcessor without torchvision (an 'internal error' of every
    image eval there); the class named in preprocessor_config.json loads (and falls back to PIL there)."""
    import transformers

    from svdlora.evaluation.loading import load_processor

    class Refusing:  # as 5.17's dummy AutoImageProcessor (whose attributes cannot even be patched there)
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers, "AutoImageProcessor", Refusing)
    processor = load_processor(vit["dense"], "image-classification")
    assert type(processor).__name__.startswith("ViTImageProcessor")


def test_a_folder_given_with_a_tilde_loads_its_tokenizer(tmp_path, monkeypatch):
    """'~/model' (quoted on the command line, or from Python): the model's load expands it, but its tokenizer
    was asked of the hub as a repo id named '~/model' and refused ('cannot load the tokenizer'), now before
    the load too (eval, sweep, compress --eval)."""
    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = svdlora.evaluate(f"~/{model.name}", task="text-generation", data=str(text), limit=1, progress=False)
    assert result["model"]["metrics"]["perplexity"] > 0


def test_evaluate_with_a_baseline_reads_each_folder_once_before_its_load(tmp_path, monkeypatch):
    """evaluate(dir, baseline=dir) built the meta model four times (the baseline's preflight, the context check's
    outline of the model, each prepare's early check) and loaded the baseline's tokenizer twice: once per folder."""
    from .eval_helpers import count_loads, lm_folder

    model, text = lm_folder(tmp_path / "a")
    baseline, _ = lm_folder(tmp_path / "b")
    calls = count_loads(monkeypatch)
    svdlora.evaluate(str(model), data=str(text), baseline=str(baseline), limit=2, max_length=16, progress=False)
    assert sorted(calls["skeleton"]) == sorted(calls["tokenizer"]) == sorted([str(model), str(baseline)])


def test_a_meta_model_that_cannot_be_built_is_tried_once_by_evaluate(tmp_path, monkeypatch):
    """evaluate(dir) without a task: the outline that could not be built (None) made infer_task build it again, to
    say why. The first failure is now the error; with a task it is left to the load, which runs."""
    from .eval_helpers import count_loads, lm_folder, unbuildable_meta_model

    model, text = lm_folder(tmp_path)
    calls = count_loads(monkeypatch)
    (model / "config.json").write_text("{")  # its config cannot be read: the error names MODEL
    with pytest.raises(svdlora.SvdloraError, match="MODEL .*cannot read its config"):
        svdlora.evaluate(str(model), data=str(text), limit=2, progress=False)
    assert calls["skeleton"] == [str(model)]

    model, text = lm_folder(tmp_path / "b")
    calls["skeleton"].clear()
    unbuildable_meta_model(monkeypatch)
    result = svdlora.evaluate(str(model), task="text-generation", data=str(text), limit=2, progress=False)
    assert result["model"]["metrics"]["perplexity"] > 0 and calls["skeleton"] == [str(model)]


@pytest.mark.parametrize(
    "config_class, settings, context",
    [
        ("MptConfig", {"max_seq_len": 24}, 24),  # MPT names its context max_seq_len
        ("Gemma3Config", {"text_config": {"max_position_embeddings": 40}}, 40),  # a vision-language model's text
        ("LlavaConfig", {"text_config": {"model_type": "llama", "max_position_embeddings": 48}}, 48),
        ("GPT2Config", {"n_positions": 32}, 32),
        ("MambaConfig", {}, None),  # no position limit
    ],
)
def test_the_context_length_of_a_causal_lm_is_read_where_its_config_keeps_it(config_class, settings, context):
    """context_length read n_positions / max_position_embeddings / n_ctx / seq_length of the config itself: MPT's
    max_seq_len and a vision-language model's (Gemma 3, Llava) text_config were not read, so `svdlora eval` asked
    for --max-length and compress --eval read windows of 1024 tokens past a shorter context."""
    import types

    import transformers

    from svdlora.evaluation.text import context_length

    model = types.SimpleNamespace(config=getattr(transformers, config_class)(**settings))
    assert context_length(model) == context


def test_a_text_too_short_to_score_is_found_from_its_head_or_else_from_the_whole_text():
    """check_scorable tokenizes the first HEAD_CHARACTERS only where they hold 2 tokens; a head of fewer (blank
    lines before the text, or a text that ends there) leaves the count to the whole text."""
    from svdlora.evaluation.text import HEAD_CHARACTERS, check_scorable

    tok = word_tokenizer(["the", "cat"])
    blank = " " * (2 * HEAD_CHARACTERS)
    check_scorable(tok, "the cat" + blank)
    check_scorable(tok, blank + "the cat")  # the head holds no token: the whole text has 2
    for short in ("the", blank + "the", "the" + blank):
        with pytest.raises(svdlora.SvdloraError, match="1 token"):
            check_scorable(tok, short)


def test_a_text_column_that_is_not_text_is_refused_not_scored_as_its_str(gpt):
    """The evaluation joined str() of every value of the text column: a column of dicts was scored as
    "{'doc': ...}" text (the calibration's reader refused it since 393addd; they share text_values now)."""
    import datasets

    data = datasets.Dataset.from_dict({"text": [{"doc": TEXT}]})
    with pytest.raises(svdlora.SvdloraError, match=r"--data reads the dataset's column 'text', which holds a dict"):
        evaluate(gpt["dense"], task="text-generation", data=data, max_length=32, device="cpu", progress=False)


def test_a_gzipped_json_lines_file_is_read_as_the_dataset_it_holds(gpt, tmp_path, capsys):
    """x.jsonl.gz was judged by its last suffix, .gz, and read as plain text: the perplexity of its JSON syntax
    ('{"text": ...}'), without a word. datasets reads it as the JSON lines it holds, as x.jsonl is read."""
    import gzip

    line = json.dumps({"text": TEXT}) + "\n"
    (tmp_path / "d.jsonl").write_text(line)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(line)
    perplexity = {}
    for name in ("d.jsonl", "d.jsonl.gz"):
        out_json = tmp_path / f"{name}.json"
        code, _, err = _cli([gpt["dense"], "--data", str(tmp_path / name), "--json", str(out_json)], capsys)
        assert code == 0, err
        perplexity[name] = json.loads(out_json.read_text())["model"]["metrics"]["perplexity"]
    assert perplexity["d.jsonl.gz"] == perplexity["d.jsonl"]


def test_a_model_passed_in_memory_gets_its_modes_back(gpt):
    """evaluate() ran a model passed in memory in eval mode and left it there: a training loop that evaluates
    between steps went on without dropout. Each module gets its own mode back (a frozen part stays frozen)."""
    tok = PreTrainedTokenizerFast.from_pretrained(gpt["dense"])
    model = GPT2LMHeadModel.from_pretrained(gpt["dense"]).train()
    model.transformer.h[0].eval()  # a part the caller froze
    evaluate(model, "text-generation", gpt["text"], baseline=model, processor=tok, max_length=32, progress=False)
    assert model.training and model.transformer.h[1].attn.training
    assert not model.transformer.h[0].training and not model.transformer.h[0].attn.training


def test_evaluate_without_progress_shows_no_bar_and_leaves_the_bar_switches_as_they_were(tmp_path, capsys):
    """evaluate(folder, progress=False) hid only svdlora's own bars: a Python caller still saw transformers'
    'Loading weights' and datasets' 'Generating train split' (a dataset file), which only the CLI's --no-progress
    switched off (transformers' only, for good)."""
    import datasets
    from transformers.utils import logging as hf_logging

    from .eval_helpers import lm_folder

    model, text = lm_folder(tmp_path)
    data = tmp_path / "data.csv"
    data.write_text(f"text\n{text.read_text()}\n")
    capsys.readouterr()
    result = svdlora.evaluate(str(model), task="text-generation", data=str(data), device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Generating train split" not in err, err
    assert result["model"]["metrics"]["windows"] >= 1
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()  # the caller's other loads'
