"""LoRA adapters extracted from a fine-tune's delta, loaded back through the real peft."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import warnings

import pytest
import torch

from svdlora.cli import main
from svdlora.errors import SvdloraError
from svdlora.extract import extract_adapter
from svdlora.integrations.peft_adapter import save_adapter, write_adapter

from .conftest import TINY_MODELS, example_inputs, file_modes, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def fine_tune(base, delta_rank: int = 2, seed: int = 1, norms: bool = True, bias: bool = False):
    """A "tuned" copy: every block matrix moved by a rank-``delta_rank`` delta, norms (and biases) nudged."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.ndim == 2 and not any(s in name for s in ("embed", "wte", "wpe", "lm_head")):
                out_f, in_f = p.shape
                p += 0.05 * torch.randn(out_f, delta_rank, generator=g) @ torch.randn(delta_rank, in_f, generator=g)
            elif norms and ("norm" in name or ".ln_" in name):
                p += 0.01 * torch.randn(p.shape, generator=g)
            elif bias and name.endswith(".bias") and "ln_" not in name:
                p += 0.01 * torch.randn(p.shape, generator=g)
    return tuned


def _pair(factory):
    torch.manual_seed(0)
    base = factory().eval()
    return base, fine_tune(base)


def _logits(model):
    with torch.no_grad():
        return model(**example_inputs("llama")).logits


def _load(base, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def deep_llama():
    """12 layers, so module names like layers.1.* and layers.11.* both exist (peft matches by suffix)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, deep_llama], ids=["llama", "gpt2-conv1d", "llama-12"])
def test_full_rank_round_trip_is_exact(factory, tmp_path):
    base, tuned = _pair(factory)
    if factory is tiny_gpt2:  # Conv1D biases change too: carried by lora_bias
        tuned = fine_tune(base, bias=True)
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, submatrices=2, progress=False)
    assert all(m.rank == 2 and m.ranks == [1, 1] for m in extraction.lora)
    got, want = _logits(_load(base, tmp_path / "adapter")), _logits(tuned)
    assert (got - want).abs().max() < 1e-4
    assert (_logits(base) - want).abs().max() > 1e-2  # the fine-tune matters
    # the tuned model is given back unchanged (peft wrapped it while saving)
    assert not any("lora" in n for n, _ in tuned.named_modules())


def test_save_adapter_writes_a_new_folder_whole_and_never_into_a_model(tmp_path):
    """extract_adapter's documented writer, save_adapter, wrote peft's files straight into the folder given, with
    no check: given the tuned model's own folder, it added adapter files beside its weights and rewrote its
    README.md, and a run stopped midway left a folder with adapter_config.json. It is now written as
    write_adapter writes it (atomically, the card and svdlora_adapter.json, never into a model's folder)."""
    base, tuned = _pair(tiny_llama)
    tuned.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / "README.md").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tuned").iterdir()}
    extraction = extract_adapter(base, tuned, rank=2, progress=False)
    with pytest.raises(SvdloraError, match="already exists"):
        save_adapter(extraction, tuned, tmp_path / "tuned")  # as extract_adapter's example calls it
    assert {p.name: p.read_bytes() for p in (tmp_path / "tuned").iterdir()} == before
    folder = save_adapter(extraction, tuned, tmp_path / "adapter")
    assert {"adapter_config.json", "svdlora_adapter.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert (_logits(_load(base, folder)) - _logits(tuned)).abs().max() < 1e-4


def test_changed_biases_do_not_raise_peft_s_unsharded_tensor_alarm(tmp_path):
    """lora_bias saves a 1-D lora_B.bias, which peft (0.21) reports as a DeepSpeed ZeRO-3 / FSDP shard
    "not gathered" (an incomplete adapter) on every extract whose biases changed: the adapter is complete."""
    base = tiny_gpt2().eval()
    tuned = fine_tune(base, bias=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    alarms = [str(w.message) for w in caught if "ZeRO-3" in str(w.message)]
    assert not alarms, alarms
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_bias"] is True


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=40)
    return ResNetForImageClassification(config)


def test_a_model_without_input_embeddings_is_extracted():
    """transformers raises NotImplementedError from ResNet's get_input_embeddings: the pair check, which
    compares vocabularies, stopped extract with an internal error."""
    torch.manual_seed(0)
    base = tiny_resnet().eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.classifier[1].weight.add_(0.05 * torch.randn(40, 1) @ torch.randn(1, 32))
    extraction = extract_adapter(base, tuned, rank=1, keep_head=False, progress=False)
    assert [m.name for m in extraction.lora] == ["classifier.1"] and extraction.lora[0].rel_error < 1e-5


def test_changed_running_statistics_go_into_the_adapter(tmp_path):
    """A fine-tune moves BatchNorm's running statistics (buffers, not parameters): they were not compared,
    so base + adapter ran with the base's statistics, silently far from the tuned model."""
    torch.manual_seed(0)
    base = tiny_resnet().eval()
    tuned = copy.deepcopy(base).train()
    with torch.no_grad():
        tuned(pixel_values=3 * torch.randn(4, 3, 32, 32) + 1)  # a training step's forward: the statistics move
        tuned.classifier[1].weight.add_(0.05 * torch.randn(40, 1) @ torch.randn(1, 32))
    tuned.eval()
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=1, keep_head=False, progress=False)
    assert "resnet.embedder.embedder.normalization" in extraction.modules_to_save
    pixels = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        got, want = _load(base, tmp_path / "adapter")(**pixels).logits, tuned(**pixels).logits
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["marian", "t5"])
def test_a_translation_model_s_adapter_is_a_seq2seq_lm_adapter(kind, tmp_path):
    """MarianMTModel and T5ForConditionalGeneration end in neither ForCausalLM nor ForSeq2SeqLM: their
    adapters were written without a task type, so peft loaded them without its Seq2SeqLM wrapper."""
    torch.manual_seed(0)
    base = TINY_MODELS[kind]().eval()
    tuned = fine_tune(base, norms=False)
    write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    model = _load(base, tmp_path / "adapter")
    assert isinstance(model, peft.PeftModelForSeq2SeqLM)
    with torch.no_grad():
        got, want = model(**example_inputs(kind)).logits, tuned(**example_inputs(kind)).logits
    assert (got - want).abs().max() < 1e-4


def _never_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the pair's dtypes were checked")


@pytest.mark.parametrize(
    ("role", "tensor"),
    [("tuned", "model.layers.0.self_attn.q_proj.weight"), ("base", "model.layers.0.mlp.up_proj.weight"),
     ("tuned", "model.norm.weight")],
)  # fmt: skip
def test_a_nan_in_either_model_is_refused_naming_the_tensor(role, tensor, tmp_path):
    """A NaN in a targeted matrix failed the SVD with 'internal error _LinAlgError ... a bug in svdlora' (exit 1);
    one in a norm was written into the adapter's modules_to_save without a word."""
    pair = dict(zip(("base", "tuned"), _pair(tiny_llama), strict=True))
    with torch.no_grad():
        pair[role].get_parameter(tensor)[0].fill_(float("nan"))
    with pytest.raises(SvdloraError, match=rf"tensor '{re.escape(tensor)}' of the {role} model contains NaN or Inf"):
        write_adapter(pair["base"], pair["tuned"], tmp_path / "adapter", rank=2, progress=False)
    assert not (tmp_path / "adapter").exists()


def test_a_pair_in_different_dtypes_is_refused(tmp_path, capsys, monkeypatch):
    """A float32 base and a bfloat16 fine-tune (each loaded as stored) differed in every tensor by the
    rounding: the untouched embedding and head were saved whole and every delta carried the rounding. The CLI
    refuses from the two configs' dtypes, before the loads."""
    base = tiny_llama().eval()
    tuned = fine_tune(copy.deepcopy(base).to(torch.bfloat16))  # a bf16 fine-tune of the base
    with pytest.raises(SvdloraError, match=r"float32 in base and torch\.bfloat16 in tuned.*--dtype"):
        extract_adapter(base, tuned, rank=2, progress=False)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    pair = ["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2", "--no-progress"]
    monkeypatch.setattr("svdlora.models.load_pretrained", _never_loaded)  # config dtypes: refused first
    err = _cli_error(capsys, ["extract", *pair, "-o", str(tmp_path / "adapter")])
    assert "stored in torch.float32" in err and "--dtype" in err and not (tmp_path / "adapter").exists()
    monkeypatch.undo()
    assert main(["extract", *pair, "-o", str(tmp_path / "adapter"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.embed_tokens" not in config["modules_to_save"]  # unchanged once both are bf16


def test_config_rank_pattern_and_modules_to_save(tmp_path):
    base, tuned = _pair(tiny_llama)
    extraction = write_adapter(base, tuned, tmp_path / "adapter", budget=0.2, progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = {m.name: m.rank for m in extraction.lora}
    assert config["rank_pattern"] == ranks
    assert config["alpha_pattern"] == ranks  # alpha = r: peft's scaling is 1
    assert sorted(config["target_modules"]) == sorted(ranks)
    assert "model.norm" in config["modules_to_save"]
    assert "model.layers.0.input_layernorm" in config["modules_to_save"]
    model = _load(base, tmp_path / "adapter")
    for name in ranks:  # peft built each module with the rank written for it
        assert model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == ranks[name]
    norm = model.base_model.model.get_submodule("model.norm").modules_to_save["default"].weight
    assert torch.equal(norm, tuned.model.norm.weight)


def test_budget_respected_and_close(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    tuned = fine_tune(base, delta_rank=16)  # delta rank above what the budget buys
    for budget in (0.1, 0.3):
        extraction = extract_adapter(base, tuned, budget=budget, submatrices=2, progress=False)
        assert extraction.lora_params <= budget * extraction.delta_params
    folder = tmp_path / "a"
    write_adapter(base, tuned, folder, budget=0.3, progress=False)
    err_budget = (_logits(_load(base, folder)) - _logits(tuned)).abs().max()
    err_base = (_logits(base) - _logits(tuned)).abs().max()
    assert err_budget < err_base


def test_changed_head_is_saved_whole(tmp_path):
    base, tuned = _pair(tiny_gpt2)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.01)  # tied to the embedding: both modules move
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    assert {"lm_head", "transformer.wte"} <= set(extraction.modules_to_save)
    assert (_logits(_load(base, tmp_path / "adapter")) - _logits(tuned)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "marian"])
def test_modules_to_save_params_count_what_the_adapter_holds(kind, tmp_path):
    """A changed tied embedding is saved by peft once per module that holds it (GPT-2's wte and head, Marian's
    shared, encoder and decoder embeddings and head): the summary and record counted it once."""
    from safetensors import safe_open

    torch.manual_seed(0)
    base = TINY_MODELS[kind]().eval()
    tuned = fine_tune(base, norms=False)
    with torch.no_grad():
        tuned.get_output_embeddings().weight.add_(0.01)  # tied: every module sharing it moves
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as weights:
        whole = sum(torch.Size(weights.get_slice(k).get_shape()).numel() for k in weights.keys() if ".lora_" not in k)
    assert extraction.modules_to_save_params == whole


def test_a_target_whose_bias_alone_changed_is_saved_whole_for_that_reason(tmp_path):
    """Its reason read 'changed, not a LoRA target (norm, embedding, head, excluded or small layer)', which it is."""
    base, tuned = _pair(tiny_gpt2)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.copy_(base.transformer.h[0].attn.c_attn.weight)
        tuned.transformer.h[0].attn.c_attn.bias.add_(0.1)
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    assert "its bias changed, its weight did not" in extraction.modules_to_save["transformer.h.0.attn.c_attn"]
    assert (_logits(_load(base, tmp_path / "adapter")) - _logits(tuned)).abs().max() < 1e-4


def test_a_tied_embedding_saved_whole_stays_tied_without_peft_s_warning(tmp_path):
    """A fine-tune that moved a tied embedding and head: peft warned on writing and on every load that
    `ensure_weight_tying` was not set (peft issue 2777), and merge_and_unload untied the two; the adapter sets it
    where peft can tie them on load: an embedding it knows by name (Llama's embed_tokens; GPT-2's wte it does not,
    and warns then that nothing is tied), and only where the embedding is saved (else: nothing to tie either)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        pytest.skip("this peft has no ensure_weight_tying")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)  # fmt: skip
    base, tuned = _pair(lambda: LlamaForCausalLM(config))
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.01)  # tied to the embedding: both modules move
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
        model = _load(base, tmp_path / "adapter")
    assert not [str(w.message) for w in caught if "tie" in str(w.message)]
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert (_logits(merged) - _logits(tuned)).abs().max() < 1e-4

    def tying(folder):
        return json.loads((folder / "adapter_config.json").read_text())["ensure_weight_tying"]

    assert tying(tmp_path / "adapter")
    base, tuned = _pair(lambda: LlamaForCausalLM(config))  # the embedding unchanged: nothing to tie
    write_adapter(base, tuned, tmp_path / "unchanged", rank=2, progress=False)
    base, tuned = _pair(tiny_gpt2)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.01)
    write_adapter(base, tuned, tmp_path / "gpt2", rank=2, progress=False)
    assert not tying(tmp_path / "unchanged") and not tying(tmp_path / "gpt2")


def test_a_factorized_head_s_base_weight_is_not_saved_over_the_base_s(tmp_path):
    """keep_head=False: peft took the LoRA'd lm_head for an embedding layer (save_embedding_layers="auto") and saved
    its base weight, the tuned head's, which loading put over the base's: the delta counted twice."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)  # fmt: skip
    base, tuned = _pair(lambda: LlamaForCausalLM(config))
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn(96, 1) @ torch.randn(1, 32))
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, keep_head=False, progress=False)
    assert "lm_head" in {m.name for m in extraction.lora}
    assert (_logits(_load(base, tmp_path / "adapter")) - _logits(tuned)).abs().max() < 1e-4


def test_extract_compress_head_gives_the_head_lora_on_the_command_line(tmp_path, capsys):
    """keep_head=False had no flag: `--include lm_head` was refused as 'fix the patterns'. --compress-head (as
    compress's) gives a changed head LoRA; without it the head is saved whole."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)  # fmt: skip
    base, tuned = _pair(lambda: LlamaForCausalLM(config))
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn(96, 1) @ torch.randn(1, 32))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    pair = ["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2", "--no-progress"]
    for flags, name in (([], "whole"), (["--compress-head"], "lora")):
        assert main(["extract", *pair, *flags, "-o", str(tmp_path / name)]) == 0
    capsys.readouterr()
    err = _cli_error(capsys, ["extract", *pair, "--include", "lm_head", "-o", str(tmp_path / "head")])
    assert "the output head lm_head is saved whole by default: --compress-head" in err, err
    whole, lora = (json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("whole", "lora"))
    assert "lm_head" in whole["modules_to_save"] and "lm_head" not in whole["target_modules"]
    assert "lm_head" in lora["target_modules"] and "lm_head" not in (lora["modules_to_save"] or [])
    assert (_logits(_load(base, tmp_path / "lora")) - _logits(tuned)).abs().max() < 1e-4


def test_a_factorized_head_tied_to_a_changed_embedding_is_written(tmp_path):
    """keep_head=False on a Llama whose head is tied to the embedding: ensure_weight_tying (set for the embedding
    saved whole) made peft wrap the head's LoRA layer as a module to save, and write_adapter failed with peft's
    TypeError. The head is a LoRA layer beside the embedding saved whole, and merges as the fine-tune."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)  # fmt: skip
    base, tuned = _pair(lambda: LlamaForCausalLM(config))
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn(96, 1) @ torch.randn(1, 32))  # and the embedding, tied
    extraction = write_adapter(base, tuned, tmp_path / "adapter", rank=2, keep_head=False, progress=False)
    assert "lm_head" in {m.name for m in extraction.lora} and "model.embed_tokens" in extraction.modules_to_save
    model = _load(base, tmp_path / "adapter")
    assert (_logits(model) - _logits(tuned)).abs().max() < 1e-4
    assert (_logits(model.merge_and_unload()) - _logits(tuned)).abs().max() < 1e-4


def test_mixed_linear_and_conv1d_targets_name_the_layers_and_the_fix(tmp_path, monkeypatch):
    """GPT-2's head (Linear) targeted beside its Conv1D blocks: the error named neither the layers nor a way out,
    and came once every delta was factorized; now before the first."""
    import svdlora.extract

    base, tuned = _pair(tiny_gpt2)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.01)

    def never(*args, **kwargs):
        raise AssertionError("a delta was factorized before the kinds were checked")

    monkeypatch.setitem(svdlora.extract.METHODS, "svd", never)
    with pytest.raises(SvdloraError, match=r"Linear \(lm_head\).*exclude=\['lm_head'\]"):
        write_adapter(base, tuned, tmp_path / "adapter", rank=2, keep_head=False, progress=False)
    monkeypatch.undo()
    write_adapter(base, tuned, tmp_path / "adapter", rank=2, keep_head=False, exclude=["lm_head"], progress=False)
    assert (_logits(_load(base, tmp_path / "adapter")) - _logits(tuned)).abs().max() < 1e-4


def test_the_tuned_model_is_given_back_as_it_was(tmp_path):
    """peft freezes the wrapped model and unloads modules_to_save as copies: the tuned model kept
    neither its trainable flags nor the tie of its embedding and head."""
    base, tuned = _pair(tiny_gpt2)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.01)  # embedding and head (tied) saved whole
    tuned.transformer.h[0].ln_1.weight.requires_grad_(False)  # a mix of flags, kept as they are
    before = {n: (p, p.requires_grad) for n, p in tuned.named_parameters(remove_duplicate=False)}
    write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    after = {n: (p, p.requires_grad) for n, p in tuned.named_parameters(remove_duplicate=False)}
    assert after.keys() == before.keys()
    assert all(after[n][0] is before[n][0] and after[n][1] == before[n][1] for n in before)
    assert tuned.lm_head.weight is tuned.transformer.wte.weight


def test_an_adapter_given_to_info_or_export_is_named_as_such(tmp_path, capsys):
    """svdlora info / export --dense of the folder extract wrote said 'not an svdlora folder: create one with
    `svdlora compress`'; they say now that it is a PEFT adapter, and how to merge it for a dense model."""
    base, tuned = _pair(tiny_llama)
    write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    for command in (["info"], ["export", "--dense", "-o", str(tmp_path / "dense")]):
        err = _cli_error(capsys, [command[0], str(tmp_path / "adapter"), *command[1:]])
        assert "is a PEFT adapter" in err and "merge_and_unload()" in err, err
    assert not (tmp_path / "dense").exists()


def test_card_and_record(tmp_path, capsys):
    base, tuned = _pair(tiny_llama)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    argv = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--budget", "0.2",
            "--submatrices", "2", "--output", str(tmp_path / "adapter"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "svdlora extract --base" in card and "--budget 0.2" in card
    assert "base_model:" not in card and f"from `{tmp_path / 'base'}`" in card  # a local folder is no hub id
    record = json.loads((tmp_path / "adapter" / "svdlora_adapter.json").read_text())
    assert record["config"]["budget"] == 0.2 and record["modules"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")


def test_the_adapter_weights_read_as_the_umask_allows(tmp_path, group_readable_umask):
    """peft writes adapter_model.safetensors owner-only (0600); the adapter's other files read 0644."""
    base, tuned = _pair(tiny_gpt2)
    write_adapter(base, tuned, tmp_path / "adapter", rank=2, progress=False)
    modes = file_modes(tmp_path / "adapter")
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_relative_base_and_tuned_are_recorded_by_their_absolute_paths(tmp_path, capsys, monkeypatch):
    """`--base ./base` was recorded as typed: the adapter then loaded its base only from that folder; and
    `--tuned ./tuned` was recorded as typed in svdlora_adapter.json and the card once --base was made absolute.
    Hub ids are recorded as given."""
    base, tuned = _pair(tiny_llama)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "--base", "base", "--tuned", "tuned", "--rank", "2", "-o", "adapter", "--no-progress"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    record = json.loads((tmp_path / "adapter" / "svdlora_adapter.json").read_text())
    assert record["tuned_model"] == str((tmp_path / "tuned").resolve())
    assert f"`{(tmp_path / 'tuned').resolve()}`" in (tmp_path / "adapter" / "README.md").read_text()
    write_adapter(base, tuned, tmp_path / "hub", rank=2, base_name="org/name", tuned_name="org/tuned", progress=False)
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/name"  # a hub id: as given
    record = json.loads((tmp_path / "hub" / "svdlora_adapter.json").read_text())
    assert record["tuned_model"] == "org/tuned"  # a hub id: as given


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    base.save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' progress bars, when no earlier test turned them off
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "gpt2"), *out])
    assert "architecture" in err
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"), *out])
    assert "equals the base" in err
    bigger = copy.deepcopy(base)
    bigger.resize_token_embeddings(100)
    bigger.save_pretrained(tmp_path / "bigger")
    capsys.readouterr()
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "bigger"), *out])
    assert "vocabulary sizes (96 vs 100" in err
    (tmp_path / "base" / ".svdlora-output").write_text("{}")  # even a folder svdlora wrote once
    for output in (tmp_path / "base", tmp_path / "base" / "adapter"):  # --overwrite never replaces an input
        argv = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "bigger"), "--rank", "2"]
        err = _cli_error(capsys, [*argv, "--output", str(output), "--overwrite", "--no-progress"])
        assert "input" in err and (tmp_path / "base" / "model.safetensors").is_file()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight += 0.01
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    argv = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), *out]
    err = _cli_error(capsys, [*argv, "--include", "k_proj"])  # unchanged layers only: the changed one is saved whole
    assert "no LoRA module to write" in err and "--include/--exclude" in err
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "base"), *out])
    assert "peft is not installed" in err
    assert not (tmp_path / "adapter").exists()


def test_method_hook_gets_each_module(monkeypatch):
    from svdlora import extract

    seen = []

    def method(delta, ranks, module=None, **svd_options):
        seen.append(module)
        return extract.svd_of_delta(delta, ranks, **svd_options)

    monkeypatch.setitem(extract.METHODS, "recording", method)
    base, tuned = _pair(tiny_llama)
    extraction = extract_adapter(base, tuned, rank=2, method="recording", progress=False)
    assert sorted(seen) == sorted(m.name for m in extraction.lora) and extraction.method == "recording"


def test_write_adapter_never_writes_into_or_around_the_models_folders(tmp_path):
    """Only the CLI checked --output against --base/--tuned: write_adapter put the adapter inside the tuned
    model's folder, and with overwrite=True replaced an svdlora folder holding it (the model with it)."""
    base, tuned = _pair(tiny_llama)
    tuned.save_pretrained(tmp_path / "out" / "tuned")
    (tmp_path / "out" / "svdlora_config.json").write_text("{}")  # an earlier svdlora output around it
    tuned = type(tuned).from_pretrained(tmp_path / "out" / "tuned")  # name_or_path: its folder
    for output, match in (("out/tuned/adapter", "inside the input"), ("out", "contains the input")):
        with pytest.raises(SvdloraError, match=match):
            write_adapter(base, tuned, tmp_path / output, rank=2, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "tuned").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_write_adapter_given_paths_says_to_load_the_models(tmp_path):
    base = tiny_llama()
    for pair in ((str(tmp_path), base), (base, str(tmp_path))):
        with pytest.raises(SvdloraError, match="must be a loaded model"):
            write_adapter(*pair, tmp_path / "adapter", budget=0.1)
    assert not (tmp_path / "adapter").exists()


def test_bad_tuned_or_base_path_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from svdlora import models

    tiny_llama().save_pretrained(tmp_path / "base")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a model")
    loaded = []
    real_load = models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda name, **kw: loaded.append(name) or real_load(name, **kw))
    capsys.readouterr()
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    base = ["--base", str(tmp_path / "base")]
    cases = [
        ([*base, "--tuned", str(tmp_path / "missing")], "--tuned", "does not exist"),
        ([*base, "--tuned", "./missing"], "--tuned", "does not exist"),
        ([*base, "--tuned", str(tmp_path / "file.txt")], "--tuned", "is a file, not a model folder"),
        ([*base, "--tuned", str(tmp_path / "empty")], "--tuned", "is not a model folder (no config.json)"),
        (["--base", str(tmp_path / "missing"), "--tuned", str(tmp_path / "base")], "--base", "does not exist"),
    ]
    for argv, flag, message in cases:
        err = _cli_error(capsys, ["extract", *argv, *out])
        assert f"error: {flag} " in err and message in err, err
    assert loaded == [], "a wrong path must be found before the base model is loaded"
    # a name that is not a local path may be a hub id: its config is asked for (offline: from the cache)
    err = _cli_error(capsys, ["extract", *base, "--tuned", "no-such-org/no-such-model", *out])
    assert "error: --tuned 'no-such-org/no-such-model': it is neither a local folder nor downloadable" in err, err
    assert loaded == [] and not (tmp_path / "adapter").exists()


def test_mismatched_pair_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Architecture, vocabulary and shapes are compared on the meta device, from the configs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from svdlora import models

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    wider = tiny_llama().config.to_dict() | {"intermediate_size": 80}
    LlamaForCausalLM(LlamaConfig(**wider)).save_pretrained(tmp_path / "wider")
    loaded = []
    monkeypatch.setattr(models, "load_pretrained", lambda name, **kw: loaded.append(name))
    capsys.readouterr()
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    for tuned, message in (("gpt2", "differ in architecture"), ("wider", "is (64, 32) in base and (80, 32) in tuned")):
        err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / tuned), *out])
        assert message in err, err
    assert loaded == [] and not (tmp_path / "adapter").exists()


def test_adapter_compressed_folder_and_bad_regex_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import svdlora
    from svdlora import models

    base, tuned = _pair(tiny_llama)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    write_adapter(base, tuned, tmp_path / "lora", rank=2, progress=False)  # a LoRA fine-tune, as peft saves it
    compressed = copy.deepcopy(tuned)
    report = svdlora.compress(compressed, budget=0.5, progress=False)
    svdlora.save_compressed(compressed, tmp_path / "svd", report=report, source=tmp_path / "tuned")
    loaded = []
    monkeypatch.setattr(models, "load_pretrained", lambda name, **kw: loaded.append(name))
    capsys.readouterr()
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    pair = ["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned")]
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "lora"), *out])
    assert "--tuned" in err and "is a PEFT adapter, not a model: merge it into its base" in err  # was: no config.json
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "svd"), "--tuned", str(tmp_path / "tuned"), *out])
    assert "--base" in err and "extract compares two dense models" in err  # was: "compress the original model"
    err = _cli_error(capsys, ["extract", *pair, *out, "--include", "q_proj", "re:(("])
    assert "--include: invalid regex pattern 're:(('" in err  # was found after both loads, without the flag
    err = _cli_error(capsys, ["extract", *pair, *out, "--exclude", "re:[a-"])
    assert "--exclude: invalid regex pattern" in err
    assert loaded == [] and not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("trusted", [[], ["--trust-remote-code"]], ids=["plain", "trust-remote-code"])
def test_a_pattern_that_matches_no_layer_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, trusted):
    """A typo in --include / --exclude was refused only after both models were loaded and checked
    (find_targets), where compress refuses it on the meta model before its load. Found by review: with
    --trust-remote-code (the pair not compared on the meta device) the typo still waited for the loads."""
    from svdlora import models

    base, tuned = _pair(tiny_llama)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    monkeypatch.setattr(models, "load_pretrained", lambda name, **kw: pytest.fail(f"loaded {name} before the check"))
    capsys.readouterr()
    argv = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "2"]
    argv += ["--output", str(tmp_path / "adapter"), "--no-progress", *trusted]
    for flag in ("--include", "--exclude"):
        err = _cli_error(capsys, [*argv, flag, "q_prj"])
        assert f"{flag} 'q_prj' matches none of the 15 Linear/Conv1D layers" in err, err
    assert not (tmp_path / "adapter").exists()


def test_a_folder_that_is_not_a_model_is_named_once(tmp_path, capsys):
    """check_model_path leaves the name to its caller; the folder checks it runs must not name it too."""
    from svdlora.models import load_pretrained

    empty = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SvdloraError) as err:
        load_pretrained(empty)
    assert str(err.value).startswith(f"model {empty!r} is not a model folder"), str(err.value)
    assert str(err.value).count(repr(empty)) == 1, str(err.value)
    tiny_llama().save_pretrained(tmp_path / "base")
    capsys.readouterr()  # save_pretrained's progress bar, shown when no earlier test turned them off
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    err = _cli_error(capsys, ["extract", "--base", str(tmp_path / "base"), "--tuned", empty, *out])
    assert f"--tuned {empty!r}: is not a model folder" in err and err.count(repr(empty)) == 1, err


def test_a_home_relative_folder_is_compared_on_the_meta_device(tmp_path, capsys, monkeypatch):
    """'~/folder' (quoted, so no shell expanded it) is the same folder to the meta comparison as to the
    load: it used to reach AutoConfig unexpanded and be refused as a malformed hub id."""
    from svdlora import models

    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(models, "load_pretrained", lambda name, **kw: pytest.fail("loaded before the check"))
    capsys.readouterr()
    out = ["--output", str(tmp_path / "adapter"), "--rank", "2", "--no-progress"]
    err = _cli_error(capsys, ["extract", "--base", "~/base", "--tuned", "~/gpt2", *out])
    assert "differ in architecture" in err, err


def test_svd_is_declared_as_in_compress(capsys):
    """compress's flag is --svd (--svd-method the old spelling); extract declared --svd-method only, so --svd
    worked by argparse's prefix matching alone and its help did not show it."""
    from svdlora.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["extract", "--base", "b", "--tuned", "t", "--rank", "2", "-o", "x",
                              "--svd", "randomized"]).svd_method == "randomized"  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--help"])
    assert "--svd {exact,randomized}, --svd-method" in capsys.readouterr().out


def test_a_config_and_keyword_options_together_are_refused_alike_by_compress_and_extract():
    """Both take the run's settings as config= or as keyword options: given both, each refuses in the same words
    (one config.config_or_options, no longer a copy in each)."""
    from svdlora import CompressionConfig, compress

    base, tuned = _pair(tiny_llama)
    both = r"pass either a config or keyword options, not both \(got \['budget'\]\)"
    with pytest.raises(SvdloraError, match=both):
        compress(copy.deepcopy(base), config=CompressionConfig(), budget=0.5, progress=False)
    with pytest.raises(SvdloraError, match=both):
        extract_adapter(base, tuned, config=CompressionConfig(), budget=0.5, progress=False)


@pytest.mark.parametrize("option, value", [("stage_dtypes", ["int8"]), ("pivot", True), ("refit", True)])
def test_compress_only_settings_are_refused_not_ignored(option, value):
    """extract writes one float LoRA pair per module: stage_dtypes were ignored (a float adapter), pivot priced the
    ranks as pivoted factors (c_proj 32x32 at budget 0.3: rank 5, 320 values of the 307 allowed) and refit never ran."""
    base, tuned = _pair(tiny_gpt2)
    with pytest.raises(SvdloraError, match=f"extract does not take {option}="):
        extract_adapter(base, tuned, budget=0.3, progress=False, **{option: value})
