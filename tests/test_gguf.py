"""`svdlora convert-gguf` on real GGUF files, written here with `gguf.GGUFWriter` the way llama.cpp's
converter writes a Llama: its tensor names, q/k rows permuted for its rotary layout, a byte-level BPE
tokenizer in the file's metadata, and no `output.weight` where the head is tied to the embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from svdlora.cli import main

gguf = pytest.importorskip("gguf")

TEXT = "the cat sat on the mat"


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*bytes_to_unicode().values(), "Ġt", "he", "<|endoftext|>"]


def _model(arch: str, tied: bool):
    """A tiny model of ``arch`` ("llama", or "gpt2": Conv1D layers, tied head, 1024 positions because
    transformers maps a GPT-2 GGUF's context length to n_ctx, not n_positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(_tokens())
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=1024,
                            bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # fmt: skip
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=64, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (its converter's `permute`; transformers undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor(arch: str, key: str, w: np.ndarray, cfg) -> np.ndarray:
    """A state-dict tensor as llama.cpp's converter stores it."""
    if arch == "gpt2" and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return w.T.copy()  # Conv1D (in, out) -> ggml's (out, in)
    if key.endswith("q_proj.weight"):
        return _permute(w, cfg.num_attention_heads)
    if key.endswith("k_proj.weight"):
        return _permute(w, cfg.num_key_value_heads)
    return w


def write_gguf(
    path: Path, tied: bool, quant: str, arch: str = "llama", merges: tuple[str, ...] = ("Ġ t", "h e")
) -> torch.nn.Module:
    """A real 2-layer GGUF at ``path`` (matrices in ``quant``: "F32" or "Q8_0"; its tokenizer's BPE ``merges``);
    returns its model."""
    tokens = _tokens()
    model = _model(arch, tied)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * cfg.hidden_size)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(list(merges))
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA, 2)
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for a tied head
        w = _gguf_tensor(arch, key, tensor.numpy(), cfg)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if quant == "Q8_0" and w.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(w, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("arch", "tied", "quant"), [("llama", False, "Q8_0"), ("llama", True, "F32"), ("gpt2", True, "F32")]
)
def test_convert_gguf_of_a_real_file_loads_as_transformers_reads_it_and_compresses(tmp_path, capsys, arch, tied, quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "gguf").mkdir()
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    reference = write_gguf(gguf_file, tied, quant, arch)
    out = tmp_path / "out"
    assert main(["convert-gguf", str(gguf_file), "-o", str(out)]) == 0, capsys.readouterr().err

    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    folder = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = gguf_tokenizer(TEXT, return_tensors="pt").input_ids
    assert tokenizer(TEXT).input_ids == ids[0].tolist()
    assert folder.dtype == torch.float32 and folder.config.tie_word_embeddings == tied
    if not tied or arch == "gpt2":  # as transformers reads the file (the same dequantized weights)
        assert torch.equal(logits(folder, ids), logits(direct.eval(), ids))
    if tied:
        # transformers 5.24 leaves a Llama GGUF's lm_head untied where the file has no output.weight
        # (its own initialization): the folder is compared with the model the file was written from
        assert folder.get_output_embeddings().weight is folder.get_input_embeddings().weight
        assert torch.allclose(logits(folder, ids), logits(reference, ids), atol=1e-6)
    else:
        assert torch.allclose(logits(folder, ids), logits(reference, ids), atol=0.05)  # Q8_0 round-off only
    if arch == "gpt2":
        assert type(folder.transformer.h[0].attn.c_attn).__name__ == "Conv1D"

    for name, extra in (("in-memory", []), ("streamed", ["--stream", "--max-shard-size", "20KB"])):
        svd = tmp_path / name
        args = ["compress", str(out), "-o", str(svd), "--calibration", "none", "--no-progress", *extra]
        assert main(args) == 0, capsys.readouterr().err
        assert (svd / "tokenizer.json").is_file()
    import svdlora

    streamed = svdlora.load_compressed(tmp_path / "streamed")
    in_memory = svdlora.load_compressed(tmp_path / "in-memory")
    assert torch.allclose(logits(streamed, ids), logits(in_memory, ids), atol=1e-5)


def test_convert_gguf_dequantizes_where_transformers_would_keep_the_blocks_packed(tmp_path, capsys, monkeypatch):
    """With a GGUF matmul kernel at hand (the `kernels` package and a published kernel for the device)
    transformers keeps quantized weights as uint8 blocks in `GgufLinear`: the folder must still hold floats."""
    quantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf")

    class Kernel:  # what get_gguf_kernel resolves where a kernel is published: it supports every type
        def supports(self, ggml_type):
            return True

    monkeypatch.setattr(quantizer, "get_gguf_kernel", lambda: Kernel())
    # transformers 5.24 packs only qwen35, qwen35moe and lfm2 so far: let it take llama's names too
    from transformers.integrations.gguf import gguf_conversion_mapping as mapping

    norms = [mapping.WeightRenaming(r"\.attn_norm\.", ".input_layernorm."),
             mapping.WeightRenaming(r"\.ffn_norm\.", ".post_attention_layernorm."),
             mapping.WeightRenaming(r"^output_norm\.", "model.norm.")]  # fmt: skip
    monkeypatch.setitem(mapping.GGUF_ARCHS, "llama", lambda config: mapping.DENSE_DECODER_RENAMINGS + norms)
    (tmp_path / "gguf").mkdir()
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    reference = write_gguf(gguf_file, tied=False, quant="Q8_0")
    assert main(["convert-gguf", str(gguf_file), "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == reference.model.layers[0].mlp.up_proj.weight.shape

    # and a transformers that packs them regardless is refused in one line, before anything is written
    import svdlora.gguf

    monkeypatch.setattr(svdlora.gguf, "_unpacked", dict)
    capsys.readouterr()
    assert main(["convert-gguf", str(gguf_file), "-o", str(tmp_path / "packed")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "svdlora" in line]  # not transformers' bars
    assert len(err) == 1 and "as torch.uint8 blocks instead of float values" in err[0], err
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("size", [10, 3000])
def test_a_gguf_file_cut_off_in_its_metadata_is_one_clean_error(tmp_path, capsys, size):
    """transformers' reader unpacks past the end of a truncated file: struct.error, which the CLI called a bug."""
    whole = tmp_path / "whole.gguf"
    write_gguf(whole, tied=True, quant="F32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:size])
    assert main(["convert-gguf", str(cut), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ends inside its metadata" in err and "download or copy it again" in err and "a bug" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["wiki.test.txt", "model.safetensors"])
def test_a_file_that_is_not_gguf_is_refused_in_the_users_own_terms(tmp_path, capsys, name):
    """Another file given as the GGUF (a text file, the model's safetensors) was refused with transformers' own
    ValueError, which names the link in svdlora's temporary folder (/tmp/svdlora-gguf-XXXX/NAME), not the file
    the user gave."""
    wrong = tmp_path / name
    wrong.write_bytes(b"= Robert Boulter =\n" * 50)
    assert main(["convert-gguf", str(wrong), "-o", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{str(wrong)!r} is not a GGUF file" in lines[0], lines
    assert "svdlora-gguf-" not in lines[0] and "a bug" not in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_whose_tokenizer_cannot_be_built_is_one_clean_error(tmp_path, capsys):
    """tokenizers raises a bare Exception for a merge whose result is not in the vocabulary, which the
    CLI called a bug, with a traceback."""
    gguf_file = tmp_path / "bad.gguf"
    write_gguf(gguf_file, tied=True, quant="F32", merges=("Ġ t", "h e", "c a"))  # 'ca' is no token
    assert main(["convert-gguf", str(gguf_file), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "its tokenizer cannot be built" in err and "out of vocabulary" in err and "a bug" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_is_the_gguf_files_even_next_to_another_models_files(tmp_path, capsys):
    """A GGUF saved in a folder with another tokenizer.json (the original checkpoint's, say): transformers
    takes that file over the GGUF's own tokenizer, and the folder held a tokenizer that does not fit the weights."""
    from transformers import AutoTokenizer

    from .eval_helpers import word_tokenizer

    (tmp_path / "gguf").mkdir()
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    write_gguf(gguf_file, tied=True, quant="F32")
    expected = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    word_tokenizer(["cat", "mat"]).save_pretrained(gguf_file.parent)  # another model's tokenizer files
    assert main(["convert-gguf", str(gguf_file), "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    written = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert written.get_vocab() == expected.get_vocab() and len(written) == len(_tokens())
    assert written(TEXT).input_ids == expected(TEXT).input_ids


def test_a_home_relative_gguf_path_is_read(tmp_path, capsys, monkeypatch):
    """'~/x.gguf' (quoted, or from a script) was 'GGUF file '~/x.gguf' does not exist', though the output's
    '~' was expanded, as every other command's paths are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_gguf(tmp_path / "tiny.gguf", tied=True, quant="F32")
    assert main(["convert-gguf", "~/tiny.gguf", "-o", "~/out"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_convert_gguf_writes_shards_of_max_shard_size_with_the_tensors_of_one_file(tmp_path, capsys):
    """convert-gguf wrote one unsharded model.safetensors whatever the model's size (28 GB for a 7B): it splits
    it as `compress --max-shard-size` does, with the index, tied tensors stored once, the same tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from svdlora.io import weight_files

    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(gguf_file, tied=True, quant="Q8_0")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["convert-gguf", str(gguf_file), "-o", str(whole)]) == 0, capsys.readouterr().err
    args = ["convert-gguf", str(gguf_file), "-o", str(sharded), "--max-shard-size", "20KB"]
    assert main(args) == 0, capsys.readouterr().err
    assert [p.name for p in weight_files(whole)] == ["model.safetensors"]
    files = weight_files(sharded)
    assert len(files) > 2 and not (sharded / "model.safetensors").exists(), files
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    assert set(index["weight_map"]) == set(tensors) and "lm_head.weight" not in tensors  # tied: stored once
    expected = load_file(whole / "model.safetensors")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    model = AutoModelForCausalLM.from_pretrained(sharded).eval()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(logits(model, ids), logits(AutoModelForCausalLM.from_pretrained(whole).eval(), ids))

    capsys.readouterr()
    assert main([*args[:3], str(tmp_path / "bad"), "--max-shard-size", "5XB"]) == 2  # before the slow load
    assert "max shard size must look like 5GB" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_convert_gguf_help_says_it_holds_one_float32_copy_of_the_model(capsys):
    """Conversion holds the whole model in float32 (transformers dequantizes it before anything is written),
    which neither `convert-gguf --help` nor the README said: a user converting a 70B found out from the OOM."""
    with pytest.raises(SystemExit):
        main(["convert-gguf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one float32 copy of the model" in text and "--max-shard-size" in text, text
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "`convert-gguf` holds one float32 copy of the model in memory" in readme


def test_convert_gguf_no_progress_hides_its_bars(tmp_path, capsys):
    """convert-gguf had no --no-progress (every other writing command has one): its dequantization and load bars
    filled a log."""
    write_gguf(tmp_path / "tiny.gguf", tied=True, quant="F32")
    convert = ["convert-gguf", str(tmp_path / "tiny.gguf"), "-o", str(tmp_path / "out"), "--overwrite"]
    assert main(convert) == 0 and "de-quantizing GGUF tensors" in capsys.readouterr().err  # the bars, by default
    assert main([*convert, "--no-progress"]) == 0  # the switch is set back after (bars.quiet_bars)
    err = capsys.readouterr().err
    assert "it/s" not in err and (tmp_path / "out" / "model.safetensors").is_file(), err


def test_gguf_to_folder_without_progress_shows_no_bar_and_leaves_transformers_switch_as_it_was(tmp_path, capsys):
    """gguf_to_folder(progress=False) hid only the dequantization bar: a Python caller still saw transformers'
    'Loading weights' bar, which only the CLI's --no-progress switched off (for good)."""
    from transformers.utils import logging as hf_logging

    from svdlora.errors import SvdloraError
    from svdlora.gguf import gguf_to_folder

    write_gguf(tmp_path / "tiny.gguf", tied=True, quant="F32")
    write_gguf(tmp_path / "bad.gguf", tied=True, quant="F32", merges=("Ġ t", "h e", "c a"))  # fails after the load
    capsys.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    gguf_to_folder(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err and (tmp_path / "out" / "model.safetensors").is_file()
    assert hf_logging.is_progress_bar_enabled()  # the caller's other loads keep their bars
    with pytest.raises(SvdloraError, match="its tokenizer cannot be built"):
        gguf_to_folder(tmp_path / "bad.gguf", tmp_path / "bad", progress=False)
    assert hf_logging.is_progress_bar_enabled() and "it/s" not in capsys.readouterr().err
    hf_logging.disable_progress_bar()  # a caller that switched them off keeps them off
    try:
        gguf_to_folder(tmp_path / "tiny.gguf", tmp_path / "out", overwrite=True, progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
