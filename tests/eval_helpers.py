"""Builders shared by the evaluation tests: offline tokenizers and tiny models, no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

import svdlora


def word_tokenizer(words, eos_suffix: bool = False, split_punctuation: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (<pad>=0, </s>=1, <unk>=2)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    if eos_suffix:  # Marian-style: the source ends in </s>
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_marian(vocab_size: int, max_positions: int = 64) -> MarianMTModel:
    """A 1+1-layer Marian in eval mode (no dropout in reference outputs), seeded."""
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
    )
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias[0, 1] = -5.0  # untrained: keep it from stopping at once
    return model


def tiny_whisper(vocab_size: int):
    """A 1+1-layer Whisper (audio input_features in, text out), seeded: an encoder-decoder that is no translator."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    shape = {"encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    sizes = {"d_model": 16, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_source_positions": 16}
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1, "decoder_start_token_id": 1}
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=vocab_size, num_mel_bins=8, max_target_positions=32, **shape, **sizes, **ids)
    return WhisperForConditionalGeneration(config).eval()


def compress_to(model, folder: Path, source: Path) -> str:
    """Compress ``model`` in place (budget 0.5, 2 stages) and save it to ``folder``."""
    report = svdlora.compress(model, budget=0.5, submatrices=2, progress=False)
    svdlora.save_compressed(model, folder, report=report, source=source)
    return str(folder)


def word_gpt2(words) -> tuple:
    """A tiny GPT-2 (seed 0) with a word tokenizer over ``words``, its embeddings resized to it."""
    from .conftest import tiny_gpt2

    torch.manual_seed(0)
    tok = word_tokenizer(words)
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tok))
    return model.eval(), tok


def word_text(words, count: int = 400) -> str:
    """``count`` words of ``words`` in a fixed order: calibration text for ``word_gpt2``."""
    return " ".join(words[(i * 7) % len(words)] for i in range(count))


def lm_folder(tmp_path):
    """A tiny GPT-2 with a word tokenizer saved beside it, and a text file it can be scored on."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    words = "the cat sat on a mat and the dog ran to it".split()
    tok = word_tokenizer(words)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=64))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "text.txt").write_text(" ".join(words * 20))
    return tmp_path / "m", tmp_path / "text.txt"


# config.json damaged three ways (the fields written over it; None: not JSON), and what its one-line refusal says
CONFIG_DAMAGE = {
    "a field of the wrong type": ({"n_layer": "two"}, ["'n_layer'", "got str (value: 'two')"]),
    "an unknown model_type": ({"model_type": "nosuchtype"}, ["model type `nosuchtype`"]),
    "not JSON": (None, ["is not a valid JSON file"]),
}


def damage_config(folder: Path, damage: str) -> list[str]:
    """``CONFIG_DAMAGE[damage]`` done to FOLDER's config.json (a GPT-2's); what the refusal must say. A wrong
    field type is skipped where huggingface_hub checks none (before transformers 5's strict configs)."""
    import json

    import pytest

    from svdlora.models import StrictDataclassError

    fields, says = CONFIG_DAMAGE[damage]
    if StrictDataclassError is ValueError and "n_layer" in (fields or {}):
        pytest.skip("this huggingface_hub checks no config field types")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}) if fields else "{")
    return says


def unbuildable_meta_model(monkeypatch) -> None:
    """The early checks' meta model cannot be built (a config only its load can judge)."""
    import svdlora.evaluation.loading as loading

    def unbuildable(*args, **kwargs):
        raise RuntimeError("cannot be built on the meta device")

    monkeypatch.setattr(loading, "_dense_skeleton", unbuildable)


def count_loads(monkeypatch) -> dict[str, list]:
    """Every tokenizer load (AutoTokenizer.from_pretrained) and meta model build, by either builder: the early
    checks' (evaluation.loading.skeleton) and the streamed plan's (streaming.planning._build), under 'skeleton'."""
    import transformers

    import svdlora.evaluation.loading as loading
    import svdlora.streaming.planning as planning

    calls: dict[str, list] = {"tokenizer": [], "skeleton": []}
    from_pretrained, skeleton, build = (
        transformers.AutoTokenizer.from_pretrained.__func__,
        loading.skeleton,
        planning._build,
    )

    def tokenizer(cls, *args, **kwargs):
        calls["tokenizer"].append(str(args[0]) if args else kwargs)
        return from_pretrained(cls, *args, **kwargs)

    def counted_skeleton(name, *args, **kwargs):
        calls["skeleton"].append(str(name))
        return skeleton(name, *args, **kwargs)

    def counted_build(source, *args, **kwargs):
        calls["skeleton"].append(str(source))
        return build(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(tokenizer))
    monkeypatch.setattr(loading, "skeleton", counted_skeleton)
    monkeypatch.setattr(planning, "_build", counted_build)
    return calls
