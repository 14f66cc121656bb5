"""Plain transformers from_pretrained on svdlora folders (the quantizer registered by `import svdlora`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import svdlora
from svdlora.integrations import SvdloraQuantizationConfig
from svdlora.integrations.quantization_config import GUARD_WEIGHTS_NAME

from .conftest import TINY_MODELS, example_inputs

AUTO = {
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
    "bert": "AutoModelForSequenceClassification",
    "vit": "AutoModelForImageClassification",
    "marian": "AutoModelForSeq2SeqLM",
    "t5": "AutoModelForSeq2SeqLM",
}


def _folder(kind: str, tmp_path, **options):
    torch.manual_seed(0)
    model = TINY_MODELS[kind]().eval()
    svdlora.compress(model, progress=False, **{"budget": 0.5, "submatrices": 2, **options})
    return svdlora.save_compressed(model, tmp_path / f"{kind}-svd")


def _logits(model, kind):
    with torch.no_grad():
        return model(**example_inputs(kind)).logits


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "vit", "marian"])
def test_from_pretrained_equals_load_compressed(kind, merge, tmp_path):
    import transformers

    folder = _folder(kind, tmp_path)
    expected = svdlora.load_compressed(folder, device="cpu", merge=merge)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    model = getattr(transformers, AUTO[kind]).from_pretrained(folder, **options)
    lowrank = [m for m in model.modules() if isinstance(m, svdlora.LowRankLinear)]
    assert bool(lowrank) is not merge
    assert len(lowrank) == (0 if merge else len(expected.svdlora_report.factorized))
    assert torch.equal(_logits(model, kind), _logits(expected, kind))
    # merged: a plain dense model, which must not claim to be svdlora when saved again
    assert hasattr(model.config, "quantization_config") is not merge


@pytest.mark.parametrize("pivot", [False, True], ids=["pairs", "pivoted"])
def test_merged_bfloat16_equals_load_compressed(pivot, tmp_path):
    """merge + dtype=bf16: both loaders multiply the stored float32 factors and round A·B once."""
    import transformers

    folder = _folder("llama", tmp_path, pivot=pivot)
    wide = svdlora.load_compressed(folder, device="cpu", merge=True).state_dict()
    merge = SvdloraQuantizationConfig(merge=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=merge)
    state = model.state_dict()
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert not [k for k in state if k.endswith("proj.weight") and not torch.equal(state[k], wide[k].bfloat16())]


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
def test_float16_keeps_t5_wo_in_float32_as_load_compressed_does(merge, tmp_path):
    """Found by review: T5's ``wo`` (``_keep_in_fp32_modules``) is kept in float32 under float16 by
    transformers for the tensors it loads, but the quantizer filled its factors in float16."""
    import transformers

    folder = _folder("t5", tmp_path)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float16, **options)
    expected = svdlora.load_compressed(folder, device="cpu", dtype=torch.float16, merge=merge)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes == {name: p.dtype for name, p in expected.named_parameters()}
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo." + ("weight" if merge else "A")] == torch.float32
    assert torch.equal(_logits(model, "t5"), _logits(expected, "t5"))


def test_a_float16_t5_folder_loads_with_its_wo_in_float32(tmp_path):
    """Found by review: compressing a T5 loaded in float16 keeps its wo in float32, as from_pretrained gives
    it; both loaders took that layer for stages stored in their own dtypes: the quantizer refused the
    folder, and a folder load_compressed loaded and saved again was written as format 2."""
    import transformers

    torch.manual_seed(0)
    TINY_MODELS["t5"]().save_pretrained(tmp_path / "base")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16)
    svdlora.compress(model, budget=0.5, submatrices=2, progress=False)
    folder = svdlora.save_compressed(model, tmp_path / "out")
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
    expected = svdlora.load_compressed(folder, device="cpu")
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.A.dtype == torch.float32
    assert torch.equal(_logits(loaded, "t5"), _logits(expected, "t5"))
    again = svdlora.save_compressed(expected, tmp_path / "again")
    assert json.loads((again / "svdlora_config.json").read_text())["format_version"] == 1


@pytest.mark.parametrize(
    ("kind", "options"),
    [("gpt2", {}), ("llama", {"pivot": True}), ("marian", {"keep_head": False})],
    ids=["gpt2-conv1d", "llama-pivoted", "marian-factorized-head"],
)
def test_dequantize_merges_the_factors_as_merge_at_load_does(kind, options, tmp_path):
    """transformers' model.dequantize() raised NotImplementedError ('svdlora has no implementation of
    `dequantize`'): it merges every low-rank layer as merge=True at load does, into a plain dense model."""
    import transformers

    folder = _folder(kind, tmp_path, **options)
    cls = getattr(transformers, AUTO[kind])
    dense = cls.from_pretrained(folder).dequantize()
    expected = svdlora.load_compressed(folder, device="cpu", merge=True)
    assert not [m for m in dense.modules() if isinstance(m, svdlora.LowRankLinear)]
    assert torch.equal(_logits(dense, kind), _logits(expected, kind))
    assert not hasattr(dense.config, "quantization_config") and not hasattr(dense, "svdlora_report")
    with pytest.raises(svdlora.SvdloraError, match="loaded merged"):
        svdlora.save_compressed(dense, tmp_path / "again")
    dense.save_pretrained(tmp_path / "dense")
    assert torch.equal(_logits(cls.from_pretrained(tmp_path / "dense"), kind), _logits(expected, kind))


def test_dtype_device_map_and_base_class(tmp_path):
    import transformers

    folder = _folder("llama", tmp_path)
    expected = svdlora.load_compressed(folder, device="cpu", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert model.model.layers[0].mlp.up_proj.A.dtype == torch.bfloat16
    assert torch.equal(_logits(model, "llama"), _logits(expected, "llama"))
    # AutoModel on a *ForCausalLM folder: module names lose the "model." prefix
    base = transformers.AutoModel.from_pretrained(folder)
    assert isinstance(base.layers[0].self_attn.q_proj, svdlora.LowRankLinear)


def test_generate_may_compile_a_static_cache_decode(tmp_path):
    """transformers compiles generate()'s forward for a static cache unless the quantizer says it cannot
    be compiled (the base class's default): the factorized layers can, so it must say so."""
    import transformers
    from transformers import CompileConfig, GenerationConfig, StaticCache

    model = transformers.AutoModelForCausalLM.from_pretrained(_folder("llama", tmp_path))
    assert model.hf_quantizer.is_compileable
    config = GenerationConfig(compile_config=CompileConfig())
    config.compile_config._compile_all_devices = True  # the CPU counts as a compile device
    cache = StaticCache(config=model.config, max_cache_len=16)
    kwargs = {"cache": cache, "past_key_values": cache}  # the key generate() uses: 5.24's, 5.17's
    assert model._valid_auto_compile_criteria(kwargs, config)


@pytest.mark.slow  # ~40 s of inductor compile on a CPU
def test_generate_compiles_a_pivoted_folder_into_one_graph(tmp_path):
    import transformers
    from transformers import CompileConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(_folder("llama", tmp_path, pivot=True)).eval()
    prompt = torch.tensor([[1, 5, 7, 9]])
    eager = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = model.generate(
        prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static",
        compile_config=compile_config,
    )  # fmt: skip
    assert compiled.tolist() == eager.tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile, without a break


def test_compressed_head_and_report(tmp_path):
    import transformers

    folder = _folder("gpt2", tmp_path, keep_head=False, budget=0.3)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model.lm_head, svdlora.LowRankLinear)
    assert model.svdlora_report.config["budget"] == 0.3
    assert torch.equal(_logits(model, "gpt2"), _logits(svdlora.load_compressed(folder, device="cpu"), "gpt2"))


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
def test_a_t5_with_a_factorized_head_loads(merge, tmp_path):
    """Found by review: T5's config ties lm_head to shared whatever tie_word_embeddings says (transformers 5),
    and transformers then marked the factorized head's weight as tied: AttributeError "`weight` is not an
    nn.Parameter" inside from_pretrained."""
    import transformers

    folder = _folder("t5", tmp_path, keep_head=False)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, **options)
    expected = svdlora.load_compressed(folder, device="cpu", merge=merge)
    assert isinstance(model.lm_head, svdlora.LowRankLinear) is not merge
    assert torch.equal(_logits(model, "t5"), _logits(expected, "t5"))


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
def test_a_translator_with_a_factorized_head_keeps_its_tied_embeddings(merge, tmp_path):
    """A factorized head sets tie_word_embeddings=False, which in transformers 5 also stops Marian tying
    encoder/decoder embed_tokens to shared: they loaded randomly initialized (reported MISSING). They are
    now tied as the file's header says, in the seq2seq class and in the base model (AutoModel)."""
    import transformers

    folder = _folder("marian", tmp_path, keep_head=False)
    expected = svdlora.load_compressed(folder, device="cpu", merge=merge)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, **options)
    assert model.model.encoder.embed_tokens.weight is model.model.shared.weight
    assert torch.equal(_logits(model, "marian"), _logits(expected, "marian"))
    base = transformers.AutoModel.from_pretrained(folder, **options)
    assert base.decoder.embed_tokens.weight is base.shared.weight


def test_another_class_loads_a_folder_whose_head_is_factorized(tmp_path):
    """AutoModel (no head) or another head on a folder with a factorized lm_head: transformers leaves
    a dense checkpoint's unused head tensors unread, so the head's factors are left unread too."""
    import transformers

    folder = _folder("llama", tmp_path, keep_head=False)
    expected = svdlora.load_compressed(folder, device="cpu")
    assert isinstance(expected.lm_head, svdlora.LowRankLinear)
    base = transformers.AutoModel.from_pretrained(folder)
    assert isinstance(base.layers[0].self_attn.q_proj, svdlora.LowRankLinear)
    ids = example_inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, expected.model(ids).last_hidden_state)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert isinstance(classifier.model.layers[0].mlp.up_proj, svdlora.LowRankLinear)


def test_folder_config_entries(tmp_path):
    folder = _folder("gpt2", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "svdlora"
    assert config["transformers_weights"] == GUARD_WEIGHTS_NAME
    # load_compressed's model is built directly: it carries neither entry, so a dense export is plain
    model = svdlora.load_compressed(folder, device="cpu", merge=True)
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.parametrize("hook", ["update_attn_implementation", "update_tp_plan", "update_ep_plan"])
def test_each_release_s_config_hook_undoes_the_guard(hook):
    """transformers up to 5.17 calls update_tp_plan / update_ep_plan before it resolves the weight file,
    later releases update_attn_implementation: with only the latter, from_pretrained on 5.17 looked for
    the guard file even after `import svdlora` (found on the GPU machine's transformers 5.17)."""
    import transformers

    from svdlora.integrations.hf_quantizer import SvdloraHfQuantizer

    quantizer = SvdloraHfQuantizer(SvdloraQuantizationConfig(weights="model.safetensors.index.json"))
    config = transformers.PretrainedConfig(transformers_weights=GUARD_WEIGHTS_NAME)
    assert getattr(quantizer, hook)(config).transformers_weights == "model.safetensors.index.json"
    other = transformers.PretrainedConfig(transformers_weights="custom.safetensors")  # not the guard: kept
    assert getattr(quantizer, hook)(other).transformers_weights == "custom.safetensors"


def test_old_folder_without_quantization_config_still_loads(tmp_path):
    folder = _folder("gpt2", tmp_path)
    expected = _logits(svdlora.load_compressed(folder, device="cpu"), "gpt2")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"], config["transformers_weights"]
    (folder / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(svdlora.load_compressed(folder, device="cpu"), "gpt2"), expected)


def test_without_svdlora_loading_fails_and_names_svdlora(tmp_path):
    folder = _folder("gpt2", tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except Exception as err:
            assert "svdlora" not in sys.modules
            print("FAILED:", type(err).__name__, err)
        else:
            print("LOADED")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("FAILED:"), result.stdout + result.stderr
    assert "import-svdlora-before-from_pretrained" in result.stdout


def test_dense_model_with_svdlora_config_is_refused(gpt2_folder):
    import transformers

    with pytest.raises(ValueError, match="cannot compress inside from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder, quantization_config=SvdloraQuantizationConfig())


def test_real_smollm2_from_pretrained(tmp_path):
    """Two decoder layers of the real SmolLM2-135M compressed; both loaders give the same logits."""
    import os
    from pathlib import Path

    import transformers

    folder = Path(os.environ.get("SVDLORA_HOME", Path.home() / ".cache" / "svdlora")) / "SmolLM2-135M"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"SmolLM2-135M not fetched (run scripts/fetch_smollm2.sh): {folder}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    svdlora.compress(model, budget=0.5, submatrices=3, include=["re:model\\.layers\\.[01]\\..*"], progress=False)
    out = svdlora.save_compressed(model, tmp_path / "smol-svd", source=folder)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        expected = svdlora.load_compressed(out, device="cpu")(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(got, expected)


def test_sharded_folder_and_strict_checks(tmp_path):
    # issue 10's shards and issue 7's strict reading hold for from_pretrained too
    import transformers

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5, submatrices=2)
    folder = svdlora.save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    expected = svdlora.load_compressed(folder, device="cpu")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(loaded, "llama"), _logits(expected, "llama"))
    record = json.loads((folder / "svdlora_config.json").read_text())
    record["report"]["modules"][0]["ranks"] = [1]  # edited: the ranks no longer fit the shards' shapes
    (folder / "svdlora_config.json").write_text(json.dumps(record))
    with pytest.raises(svdlora.SvdloraError, match="re-run `svdlora compress`"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("subfolder", ["", "sub"])
def test_a_hub_snapshot_without_the_svdlora_config_says_to_download_the_repository(subfolder, tmp_path):
    """from_pretrained(HUB_ID) fetches config.json and the weights, not svdlora_config.json: the folder check said
    "is not an svdlora folder (no svdlora_config.json): create one with `svdlora compress`" of the cache's snapshot
    (and still did with subfolder=, whose files lie below the snapshot)."""
    import shutil

    import transformers

    folder = _folder("llama", tmp_path)
    snapshot = tmp_path / "cache" / "models--me--tiny-svd" / "snapshots" / "0123abcd"
    (snapshot / subfolder).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):  # what from_pretrained downloads
        shutil.copy(folder / name, snapshot / subfolder / name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    hub = {"cache_dir": tmp_path / "cache", "subfolder": subfolder}
    with pytest.raises(svdlora.SvdloraError, match=r"snapshot_download\('me/tiny-svd'\)"):
        transformers.AutoModelForCausalLM.from_pretrained("me/tiny-svd", **hub)
    shutil.copy(folder / "svdlora_config.json", snapshot / subfolder / "svdlora_config.json")  # as snapshot_download
    loaded = transformers.AutoModelForCausalLM.from_pretrained("me/tiny-svd", **hub)
    assert torch.equal(_logits(loaded, "llama"), _logits(svdlora.load_compressed(folder, device="cpu"), "llama"))


def test_a_corrupted_shard_index_is_named_as_load_compressed_names_it(tmp_path):
    """transformers reads a sharded folder's index before the quantizer's folder checks: a corrupted one
    gave a bare 'JSONDecodeError: Expecting property name ...' that named no file."""
    import transformers

    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5)
    folder = svdlora.save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    (folder / "model.safetensors.index.json").write_text("{oops")
    for load in (svdlora.load_compressed, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(svdlora.SvdloraError, match=r"index\.json is corrupted \(.*\): re-run `svdlora compress`"):
            load(folder)


@pytest.mark.parametrize("top_index", [False, True], ids=["top-without-index", "top-with-corrupted-index"])
def test_from_pretrained_with_a_subfolder_checks_the_subfolder_s_index(top_index, tmp_path):
    """from_pretrained(parent, subfolder="sub") loads parent/sub, but the quantizer checked the index of parent (the
    config's name_or_path): a corrupted one in sub gave transformers' bare JSONDecodeError, and one in parent
    refused a sound parent/sub."""
    import transformers

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5, submatrices=2)
    folder = svdlora.save_compressed(model, tmp_path / "parent" / "sub", max_shard_size="20KB")
    if top_index:  # another folder's index, which this load does not read
        (folder.parent / "model.safetensors.index.json").write_text("{oops")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder.parent, subfolder="sub")
    assert torch.equal(_logits(loaded, "llama"), _logits(svdlora.load_compressed(folder, device="cpu"), "llama"))
    (folder / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(svdlora.SvdloraError, match=r"sub/model\.safetensors\.index\.json is corrupted \("):
        transformers.AutoModelForCausalLM.from_pretrained(folder.parent, subfolder="sub")


def test_from_pretrained_given_another_folder_s_config_checks_the_loaded_folder_s_index(tmp_path):
    """config=AutoConfig.from_pretrained(other): the config's name_or_path is the other folder, whose index the
    quantizer checked, refusing a sound folder for the other's corrupted index."""
    import transformers

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5, submatrices=2)
    folder = svdlora.save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    other = svdlora.save_compressed(model, tmp_path / "other", max_shard_size="20KB")
    (other / "model.safetensors.index.json").write_text("{oops")
    config = transformers.AutoConfig.from_pretrained(other)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config)
    assert torch.equal(_logits(loaded, "llama"), _logits(svdlora.load_compressed(folder, device="cpu"), "llama"))


def test_a_shard_the_index_leaves_out_is_refused_not_loaded_as_random_weights(tmp_path):
    """An index that names no tensor of one shard (the norms and the embedding, here): load_compressed blamed
    another shard, and from_pretrained loaded the model with those weights randomly initialized."""
    import json

    import transformers

    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5)
    folder = svdlora.save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    left_out = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != left_out}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for load in (svdlora.load_compressed, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(svdlora.SvdloraError, match=rf"names no tensor of \['{left_out}'\].*incomplete"):
            load(folder)


def test_from_pretrained_reads_the_index_and_each_shard_s_header_once(tmp_path, monkeypatch):
    """The quantizer read the index twice and every shard's header three times (the folder check, the factor
    layouts, again to read the factors even where it held none), the first shard's a fourth (the ties): on a
    network file system, for each of a 70B checkpoint's ~30 shards. Now the folder check's one pass serves all,
    and only the shards holding factors are opened again, to read them."""
    from collections import Counter
    from pathlib import Path

    import transformers
    from safetensors import safe_open

    import svdlora.integrations.folder_layout  # imported before their safe_open is patched below
    import svdlora.integrations.hf_quantizer
    import svdlora.io.folder
    import svdlora.io.writer

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    svdlora.compress(model, progress=False, budget=0.5, submatrices=2)
    folder = svdlora.save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    expected = _logits(svdlora.load_compressed(folder, device="cpu"), "llama")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with_factors = {shard for key, shard in weight_map.items() if ".stage" in key or ".pivoted." in key}
    assert set(weight_map.values()) - with_factors  # a shard without factors: read for its header only
    opened, indexes = Counter(), []  # svdlora's reads only: transformers opens the shards itself too
    weight_files = svdlora.io.writer.weight_files
    for module in [m for name, m in sys.modules.items() if name.startswith("svdlora")]:
        if vars(module).get("safe_open") is safe_open:  # vars: svdlora.io's lazy names stay uncached
            monkeypatch.setattr(
                module, "safe_open", lambda f, **kw: opened.update([Path(f).name]) or safe_open(f, **kw)
            )
        if vars(module).get("weight_files") is weight_files:
            monkeypatch.setattr(module, "weight_files", lambda f, **kw: indexes.append(f) or weight_files(f, **kw))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert len(indexes) == 1
    assert opened == Counter({shard: 1 + (shard in with_factors) for shard in weight_map.values()})
    assert torch.equal(_logits(loaded, "llama"), expected)


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_from_pretrained_loads_pivoted_factors(kind, merge, tmp_path):
    import transformers

    folder = _folder(kind, tmp_path, pivot=True)
    expected = svdlora.load_compressed(folder, device="cpu", merge=merge)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    model = getattr(transformers, AUTO[kind]).from_pretrained(folder, **options)
    pivoted = [m for m in model.modules() if isinstance(m, svdlora.pivoted.PivotedLowRankLinear)]
    assert len(pivoted) == (0 if merge else len(expected.svdlora_report.factorized))
    assert torch.equal(_logits(model, kind), _logits(expected, kind))


def test_save_pretrained_of_a_factorized_model_is_refused_and_names_save_compressed(tmp_path):
    """transformers would write the factors under plain names: the folder would reload with every
    factorized matrix freshly initialized. Merged models save as plain dense checkpoints."""
    import copy
    import pickle

    import transformers

    folder = _folder("llama", tmp_path)
    loaders = {
        "load_compressed": lambda: svdlora.load_compressed(folder, device="cpu"),
        "from_pretrained": lambda: transformers.AutoModelForCausalLM.from_pretrained(folder),
    }
    for name, load in loaders.items():
        model = load()
        for each in (model, copy.deepcopy(model)):
            with pytest.raises(svdlora.SvdloraError, match="save_compressed"):
                each.save_pretrained(tmp_path / f"{name}-resaved")
        assert not (tmp_path / f"{name}-resaved").exists()
        svdlora.save_compressed(model, tmp_path / f"{name}-compressed")  # the way that round-trips
        again = svdlora.load_compressed(tmp_path / f"{name}-compressed", device="cpu")
        assert torch.equal(_logits(again, "llama"), _logits(model, "llama"))
    for model in (svdlora.load_compressed(folder, device="cpu"), loaders["from_pretrained"]()):
        again = pickle.loads(pickle.dumps(model))  # torch.save(model), spawned workers: still pickles
        assert torch.equal(_logits(again, "llama"), _logits(model, "llama"))
        with pytest.raises(svdlora.SvdloraError, match="save_compressed"):
            again.save_pretrained(tmp_path / "pickled")
    stacked = svdlora.load_compressed(folder, device="cpu", stack_siblings=True)
    for name, module in list(stacked.named_modules()):  # only stacked siblings left: factors all the same
        if isinstance(module, svdlora.LowRankLinear):
            stacked.set_submodule(name, module.to_dense())
    with pytest.raises(svdlora.SvdloraError, match="save_compressed"):
        stacked.save_pretrained(tmp_path / "stacked")
    adapted = svdlora.load_compressed(folder, device="cpu")
    adapted._hf_peft_config_loaded = True  # transformers then writes the adapter's weights only
    try:  # past the guard, into transformers' peft save (which has no adapter to write here)
        adapted.save_pretrained(tmp_path / "adapter")
    except svdlora.SvdloraError:
        pytest.fail("the guard refused a model with a peft adapter loaded")
    except Exception:  # noqa: BLE001, S110  transformers' own answer
        pass
    merged = svdlora.load_compressed(folder, device="cpu", runtime="merged")  # no factors left: a dense save
    merged.save_pretrained(tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(_logits(dense, "llama"), _logits(merged, "llama"))


def test_save_pretrained_of_a_merged_translator_with_a_factorized_head_keeps_its_embeddings(tmp_path):
    """The factorized head's tie_word_embeddings=False also stops transformers 5 tying Marian's
    encoder/decoder embed_tokens to shared, and save_pretrained wrote shared only: the dense checkpoint
    of a merged model (either loader, or runtime="merged") reloaded them randomly initialized. The saved
    model keeps its own ties in memory; a tied head (GPT-2, head kept) is still written once."""
    import transformers
    from safetensors import safe_open

    folder = _folder("marian", tmp_path, keep_head=False)
    loaders = {
        "merge": lambda: svdlora.load_compressed(folder, device="cpu", merge=True),
        "runtime": lambda: svdlora.load_compressed(folder, device="cpu", runtime="merged"),
        "from_pretrained": lambda: transformers.AutoModelForSeq2SeqLM.from_pretrained(
            folder, quantization_config=SvdloraQuantizationConfig(merge=True)
        ),
    }
    for name, load in loaders.items():
        merged = load()
        merged.save_pretrained(tmp_path / name)
        assert merged.model.encoder.embed_tokens.weight is merged.model.shared.weight  # saving unties nothing
        dense = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name)
        assert torch.equal(_logits(dense, "marian"), _logits(merged, "marian")), name
    gpt2 = svdlora.load_compressed(_folder("gpt2", tmp_path), device="cpu", merge=True)
    gpt2.save_pretrained(tmp_path / "gpt2-dense")
    with safe_open(str(tmp_path / "gpt2-dense" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to wte: written once


def test_save_pretrained_of_a_merged_translator_given_no_state_dict_keeps_its_embeddings(tmp_path):
    """Found by review: state_dict=None passed on (as transformers' Trainer saves a model) counted as the
    caller's own state dict, and the merged translator's encoder/decoder embed_tokens were not written."""
    import transformers

    merged = svdlora.load_compressed(_folder("marian", tmp_path, keep_head=False), device="cpu", merge=True)
    merged.save_pretrained(tmp_path / "dense", state_dict=None)
    merged.save_pretrained(tmp_path / "positional", True, None)  # (was: state_dict given twice, TypeError)
    for name in ("dense", "positional"):
        dense = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name)
        assert torch.equal(_logits(dense, "marian"), _logits(merged, "marian")), name


@pytest.mark.parametrize(
    "stage_dtypes, version",
    [("full-int4,int8", 2), ("full-int4,int8", 3), ("full-int4,int8", 4), ("float16", 4), (None, 4), ("float32", 2)],
)
def test_from_pretrained_refuses_stages_in_their_own_dtypes_at_any_format(stage_dtypes, version, tmp_path, monkeypatch):
    """What the folder holds decides, not its format number: format 2 is only the lowest that carries stage
    dtypes (3, pivoted factors beside them, and 4, an error not measured, carry them too). A folder whose
    stages are all in the model's dtype is stored as a plain one and loads at any format."""
    import transformers

    from svdlora.io import saving

    real = saving.folder_format
    monkeypatch.setattr(saving, "folder_format", lambda model, report=None: max(real(model, report), version))
    options = {"stage_dtypes": stage_dtypes, "submatrices": len(stage_dtypes.split(","))} if stage_dtypes else {}
    folder = _folder("llama", tmp_path, **options)
    assert json.loads((folder / "svdlora_config.json").read_text())["format_version"] == version
    if stage_dtypes in (None, "float32"):  # the tiny model's dtype
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert torch.equal(_logits(loaded, "llama"), _logits(svdlora.load_compressed(folder, device="cpu"), "llama"))
        return
    with pytest.raises(ValueError, match="stores its stages in their own dtypes.*load_compressed"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("pivot", [False, True], ids=["pairs", "pivoted"])
def test_a_config_json_whose_factorized_layers_changed_shape_is_refused_as_load_compressed_refuses_it(pivot, tmp_path):
    """An edited (or another model's) config.json that changes only factorized layers' shapes: the quantizer built
    each low-rank layer at the config's shape around the file's factors, which loaded (pairs: a model whose layers
    disagree with its config; pivoted: an IndexError in the forward) where load_compressed refuses in one line."""
    import transformers

    folder = _folder("llama", tmp_path, pivot=pivot)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the MLP's layers only, all of them factorized
    (folder / "config.json").write_text(json.dumps(config))
    for load in (
        lambda: svdlora.load_compressed(folder, device="cpu"),
        lambda: transformers.AutoModelForCausalLM.from_pretrained(folder),
    ):
        with pytest.raises(
            svdlora.SvdloraError, match=r"mlp\.\w+_proj' is a Linear\[(128, 32|32, 128)\] in the model.*edited"
        ):
            load()


def test_push_to_hub_of_a_factorized_model_is_refused_before_the_hub_repository_is_created(tmp_path, monkeypatch):
    """transformers' push_to_hub creates the repository and its model card, then calls save_pretrained: the guard
    refused there, after an empty repository had been made on the hub. It refuses first now."""
    import huggingface_hub
    import transformers

    def created(*args, **kwargs):
        raise AssertionError("push_to_hub created a hub repository")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", created)
    folder = _folder("llama", tmp_path)
    for model in (
        svdlora.load_compressed(folder, device="cpu"),
        svdlora.load_compressed(folder, device="cpu", stack_siblings=True),
        transformers.AutoModelForCausalLM.from_pretrained(folder),
    ):
        with pytest.raises(svdlora.SvdloraError, match="save_compressed"):
            model.push_to_hub("someone/compressed")
    merged = svdlora.load_compressed(folder, device="cpu", merge=True)  # a dense model: on to transformers' push
    with pytest.raises(AssertionError, match="created a hub repository"):
        merged.push_to_hub("someone/merged")


@pytest.mark.parametrize("merge", ["no", 0, None])
def test_the_quantization_config_s_merge_must_be_a_bool(merge):
    """SvdloraQuantizationConfig(merge="no") merged (bool("no")), as load_compressed(merge="no") did before it was
    refused; 0 and None passed as False unnoticed."""
    with pytest.raises(svdlora.SvdloraError, match="merge must be True or False"):
        SvdloraQuantizationConfig(merge=merge)
