"""The folder format: save -> load gives the same model, factorized or merged; damage is explained."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from svdlora import LowRankLinear, SvdloraError, compress, load_compressed, save_compressed
from svdlora.io import CONFIG_NAME, WEIGHTS_NAME, read_report

from .conftest import MLP, TINY_MODELS, example_inputs, output_of


def compressed_folder(kind, tmp_path, **options):
    torch.manual_seed(0)
    model = TINY_MODELS[kind]().eval()
    base = tmp_path / f"{kind}-base"
    model.save_pretrained(base)
    compress(model, progress=False, **{"budget": 0.5, "submatrices": 3, **options})
    out = save_compressed(model, tmp_path / f"{kind}-svd", source=base)
    return model, out


@pytest.mark.parametrize("pivot", [False, True])
def test_a_compiled_model_saves_what_it_wraps(tmp_path, pivot):
    """torch.compile's wrapper names every tensor ``_orig_mod.…``: the folder holds the model's own names."""
    torch.manual_seed(0)
    model = TINY_MODELS["gpt2"]().eval()
    compress(model, budget=0.5, pivot=pivot, progress=False)
    compiled = torch.compile(model, backend="eager")
    save_compressed(compiled, tmp_path / "out")
    torch.testing.assert_close(
        output_of(load_compressed(tmp_path / "out", device="cpu"), "gpt2"), output_of(model, "gpt2")
    )


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_save_load_gives_identical_outputs(kind, tmp_path):
    model, out = compressed_folder(kind, tmp_path)
    expected = output_of(model, kind)
    loaded = load_compressed(out, device="cpu")
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert torch.equal(output_of(loaded, kind), expected)
    merged = load_compressed(out, device="cpu", merge=True)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    assert torch.allclose(output_of(merged, kind), expected, atol=1e-5)


def test_a_merged_gpt2_s_state_dict_saves_as_a_dense_one_does(tmp_path):
    """merge=True gives a dense GPT-2 whose Conv1D weights are contiguous (in, out) tensors, as
    from_pretrained's are, so safetensors saves its state dict (the tied head left out, as for any GPT-2)."""
    _, out = compressed_folder("gpt2", tmp_path)
    state = load_compressed(out, device="cpu", merge=True).state_dict()
    del state["lm_head.weight"]  # tied to wte: safetensors refuses a shared tensor twice
    assert [k for k, t in state.items() if not t.is_contiguous()] == []
    save_file(state, tmp_path / "dense.safetensors")


@pytest.mark.parametrize(
    ("kind", "options"),
    [("llama", {}), ("llama", {"pivot": True}), ("gpt2", {}), ("llama", {"stage_dtypes": ["full-int4", "int8"]})],
)
def test_merged_load_in_a_narrower_dtype_rounds_the_product_once(kind, options, tmp_path):
    """merge + dtype=bf16: A·B is formed from the stored float32 factors and rounded to bf16 once,
    not multiplied from factors already rounded to bf16 (which puts both roundings into W)."""
    _, out = compressed_folder(kind, tmp_path, **options)
    wide = load_compressed(out, device="cpu", merge=True).state_dict()
    narrow = load_compressed(out, device="cpu", merge=True, dtype=torch.bfloat16).state_dict()
    merged = [k for k in narrow if k.endswith(".weight") and not torch.equal(narrow[k], wide[k].bfloat16())]
    assert not merged
    assert all(t.dtype == torch.bfloat16 for t in narrow.values() if t.is_floating_point())


@pytest.mark.parametrize("options", [{"pivot": True}, {"stage_dtypes": ["full-int4", "int8"]}])
def test_layers_auto_merges_in_a_narrower_dtype_are_those_of_a_merged_load(options, tmp_path, monkeypatch):
    """runtime="auto" merged from factors already rounded to bf16; now its merged layers hold what
    merge=True builds (A·B from the stored factors, rounded once)."""
    import svdlora.runtime

    _, out = compressed_folder("llama", tmp_path, **options)
    monkeypatch.setattr(svdlora.runtime, "choose", lambda *args, **kwargs: "merged")
    auto = load_compressed(out, device="cpu", dtype=torch.bfloat16, runtime="auto")
    assert not any(isinstance(m, LowRankLinear) for m in auto.modules())
    merged = load_compressed(out, device="cpu", dtype=torch.bfloat16, merge=True).state_dict()
    assert all(torch.equal(t, merged[k]) for k, t in auto.state_dict().items())


@pytest.mark.parametrize("dtype", [None, torch.float32])
@pytest.mark.parametrize("options", [{"pivot": True}, {"stage_dtypes": ["full-int4", "int8"]}])
def test_auto_reads_the_folder_once_when_its_factors_are_not_narrowed(options, dtype, tmp_path, monkeypatch):
    """The rebuild above is for factors narrower than the stored ones; in the stored dtype (or a
    wider one) the merged layers in memory are already what merge=True builds, and the folder is
    read once."""
    import svdlora.io.load
    import svdlora.runtime

    _, out = compressed_folder("llama", tmp_path, **options)
    monkeypatch.setattr(svdlora.runtime, "choose", lambda *args, **kwargs: "merged")
    reads = []
    read_state = svdlora.io.load.read_state
    monkeypatch.setattr(
        svdlora.io.load, "read_state", lambda *a, **k: reads.append(k.get("only")) or read_state(*a, **k)
    )
    auto = load_compressed(out, device="cpu", dtype=dtype, runtime="auto")
    assert reads == [None]
    merged = load_compressed(out, device="cpu", dtype=dtype, merge=True).state_dict()
    assert all(torch.equal(t, merged[k]) for k, t in auto.state_dict().items())


def test_a_load_reads_each_shard_s_header_once(tmp_path, monkeypatch):
    """load_compressed checked every shard's header again right after check_folder had checked them all."""
    import svdlora.io.folder

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    compress(model, progress=False, budget=0.5)
    out = save_compressed(model, tmp_path / "svd", max_shard_size="30KB")
    shards = svdlora.io.weight_files(out)
    checked = []
    check_header = svdlora.io.folder._check_header
    monkeypatch.setattr(svdlora.io.folder, "_check_header", lambda f: checked.append(f.name) or check_header(f))
    load_compressed(out, device="cpu")
    assert len(shards) > 1 and sorted(checked) == sorted(f.name for f in shards)


def test_check_folder_opens_each_shard_once(tmp_path, monkeypatch):
    """check_folder opened every shard twice: once for the metadata, once for the shapes."""
    import svdlora.io.folder

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    compress(model, progress=False, budget=0.5)
    out = save_compressed(model, tmp_path / "svd", max_shard_size="30KB")
    opened = []
    monkeypatch.setattr(svdlora.io.folder, "safe_open", lambda f, **kw: opened.append(f) or safe_open(f, **kw))
    svdlora.io.check_folder(out)
    assert len(opened) > 1 and sorted(opened) == sorted(str(f) for f in svdlora.io.weight_files(out))


def test_stages_are_stored_by_name_and_header_is_checked(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"transformer.h.0.attn.c_attn.stage0.A", "transformer.h.0.attn.c_attn.stage2.B"} <= keys
    assert meta["format"] == "pt" and meta["svdlora_version"]
    # GPT-2 ties lm_head to the token embedding: stored once, recorded in the metadata.
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert json.loads(meta["tied"]) == {"lm_head.weight": "transformer.wte.weight"}
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["base_model"]["class"] == "GPT2LMHeadModel"
    ranks = {m["name"]: m["ranks"] for m in config["report"]["modules"]}
    assert len(ranks["transformer.h.0.attn.c_attn"]) == 3
    assert (out / "config.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pkl")), "no pickle anywhere"


def test_loaded_model_generates_and_keeps_ties(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    model = load_compressed(out, device="cpu")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_dtype_on_load(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    model = load_compressed(out, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_model_built_from_its_config_saves_its_class_in_config_json(tmp_path):
    """save_pretrained writes config.json's architectures; save_compressed of a model never saved (built from its
    config, as these tests build them) wrote none, so svdlora eval of the folder warned 'config.json names no
    known architecture (None): loading with AutoModel, which has no task head' of a model loaded with its head."""
    from transformers import AutoConfig

    from svdlora.models import model_class

    torch.manual_seed(0)
    model = TINY_MODELS["marian"]().eval()
    compress(model, budget=0.5, progress=False)
    out = save_compressed(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MarianMTModel"]
    assert model_class(AutoConfig.from_pretrained(out)).__name__ == "MarianMTModel"


def test_plain_pytorch_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(5, 48)
    compress(model, budget=0.4, submatrices=2, progress=False)
    out = save_compressed(model, tmp_path / "mlp-svd")
    loaded = load_compressed(out, device="cpu", model=MLP())
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(SvdloraError, match="model=<a MLP>"):
        load_compressed(out, device="cpu")
    # found by review: passing the loaded (or compressed) instance again said 'the folder was edited; re-run compress'
    for again in (loaded, model):
        with pytest.raises(SvdloraError, match="MLP that already holds svdlora low-rank layers .* freshly built MLP"):
            load_compressed(out, device="cpu", model=again)


def test_a_plain_model_s_folder_without_its_instance_is_refused_as_a_plain_model_s(tmp_path, capsys):
    """Without model=, load_compressed and svdlora eval of a plain PyTorch model's folder said "has no usable
    config.json (Unrecognized model in ... Should have a `model_type` key in its config.json.)": it has no
    config.json, and no model_type would rebuild it (export named it right)."""
    from svdlora.cli import main

    model = MLP()
    compress(model, budget=0.5, progress=False)
    out = save_compressed(model, tmp_path / "mlp-svd")
    said = "holds a plain PyTorch model (MLP, no config.json): pass load_compressed(path, model=<a MLP>)"
    with pytest.raises(SvdloraError) as err:
        load_compressed(out, device="cpu")
    assert said in str(err.value) and "model_type" not in str(err.value)
    assert main(["eval", str(out), "--data", str(out / "README.md"), "--no-progress"]) == 2
    assert said in capsys.readouterr().err


def test_existing_output_is_refused_then_overwritten(tmp_path):
    model, out = compressed_folder("gpt2", tmp_path)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SvdloraError, match="already exists: pass --overwrite"):
        save_compressed(model, out)
    assert (out / "keep.txt").exists()
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / WEIGHTS_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folders left"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = compressed_folder("gpt2", tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("svdlora.io.writer.ShardedWriter.write", boom)
    with pytest.raises(OSError):
        save_compressed(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_not_a_compressed_folder(tmp_path):
    with pytest.raises(SvdloraError, match="does not exist"):
        load_compressed(tmp_path / "missing")
    with pytest.raises(SvdloraError, match="not an svdlora folder"):
        load_compressed(tmp_path)


def test_corrupted_weights(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    (out / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SvdloraError, match="corrupted"):
        load_compressed(out, device="cpu")


def test_corrupted_config(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(SvdloraError, match="corrupted"):
        load_compressed(out, device="cpu")


def test_missing_factor(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    path = out / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    del tensors["transformer.h.1.mlp.c_fc.stage1.B"]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(SvdloraError, match="lacks tensor .transformer.h.1.mlp.c_fc.stage1.B"):
        load_compressed(out, device="cpu")


@pytest.mark.parametrize("pivot", [False, True])
def test_a_layer_whose_ranks_were_removed_is_refused_naming_its_ranks(tmp_path, pivot):
    """A factorized layer's config entry without its ranks was refused as 'pivoted is True, expected false for a
    dense layer' (pivoted) or 'ranks is []' (the key is missing, not empty): the check names the missing ranks."""
    _, out = compressed_folder("gpt2", tmp_path, pivot=pivot)
    config = json.loads((out / CONFIG_NAME).read_text())
    del config["report"]["modules"][0]["ranks"]
    (out / CONFIG_NAME).write_text(json.dumps(config))
    said = r"field report\.modules\[0\]\.ranks is None, expected ranks, or a dense_reason for a layer kept dense"
    with pytest.raises(SvdloraError, match=said):
        load_compressed(out, device="cpu")


def test_other_format_version(tmp_path):
    _, out = compressed_folder("gpt2", tmp_path)
    config = json.loads((out / CONFIG_NAME).read_text())
    config["format_version"], config["svdlora_version"] = 99, "9.0.0"
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match="format 99 .*svdlora 9.0.0"):
        load_compressed(out, device="cpu")
    path = out / WEIGHTS_NAME
    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "pt", "svdlora_format_version": "7", "svdlora_version": "7.0"})
    config["format_version"] = 1
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match="written by svdlora '7.0' in format '7'"):
        load_compressed(out, device="cpu")


def test_a_newer_format_is_named_before_its_other_fields_are_read(tmp_path):
    """A newer format may lay out svdlora_config.json otherwise: its version is what to report,
    not a missing 'report' entry (which said the folder was corrupted)."""
    _, out = compressed_folder("gpt2", tmp_path)
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(format_version=99, svdlora_version="9.0.0", layers=config.pop("report"))
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match="format 99 .*svdlora 9.0.0"):
        load_compressed(out, device="cpu")


def test_a_folder_of_a_newer_format_asks_for_a_newer_svdlora(tmp_path):
    """Each loader's refusal of a format above this one says to upgrade (it said: install the matching
    version or re-run compress; from_pretrained named only the highest format it reads)."""
    from transformers import AutoModelForCausalLM

    from svdlora.version import FORMAT_VERSION

    _, out = compressed_folder("gpt2", tmp_path)
    newer = FORMAT_VERSION + 1
    hf_config = json.loads((out / "config.json").read_text())
    hf_config["quantization_config"]["format_version"] = newer
    (out / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match=f"uses format {newer} .*reading formats 1, .*: upgrade svdlora"):
        AutoModelForCausalLM.from_pretrained(out)
    path = out / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt", "svdlora_format_version": str(newer)})
    with pytest.raises(SvdloraError, match=f"in format '{newer}'; .*: upgrade svdlora"):
        load_compressed(out, device="cpu")
    config = json.loads((out / CONFIG_NAME).read_text())
    config["format_version"] = newer
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match=f"format {newer} .*: upgrade svdlora"):
        load_compressed(out, device="cpu")
    config["format_version"] = 0  # not a newer format: damaged
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match="format 0 .*re-run `svdlora compress`"):
        load_compressed(out, device="cpu")


def test_report_survives_the_roundtrip(tmp_path):
    model, out = compressed_folder("bert", tmp_path)
    report = read_report(out)
    assert report.modules == model.svdlora_report.modules
    assert report.bytes_after == (out / WEIGHTS_NAME).stat().st_size
    assert report.bytes_before is not None and report.bytes_before > report.bytes_after


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("merge", [False, True])
def test_load_on_gpu(tmp_path, merge):
    model, out = compressed_folder("llama", tmp_path)
    loaded = load_compressed(out, merge=merge)  # default device: CUDA when available
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    inputs = {k: v.cuda() for k, v in example_inputs("llama").items()}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits.cpu(), output_of(model, "llama"), atol=1e-4)


def test_compressed_tied_head_roundtrips_twice(tmp_path):
    """--compress-head on a tied model: the head becomes factors, the embedding stays, and a
    loaded model can be saved and loaded again."""
    model, out = compressed_folder("gpt2", tmp_path, keep_head=False)
    assert isinstance(model.lm_head, LowRankLinear)
    expected = output_of(model, "gpt2")
    loaded = load_compressed(out, device="cpu")
    assert set(dict(loaded.lm_head.named_parameters())) == {"A", "B"}
    again = save_compressed(loaded, tmp_path / "again")
    assert torch.equal(output_of(load_compressed(again, device="cpu"), "gpt2"), expected)


def test_model_of_another_architecture_is_refused(tmp_path):
    model = MLP()
    compress(model, budget=0.5, progress=False)
    out = save_compressed(model, tmp_path / "mlp-svd")
    other = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))
    with pytest.raises(SvdloraError, match="does not have"):
        load_compressed(out, device="cpu", model=other)


def test_a_plain_model_built_with_other_sizes_is_named_as_the_likely_fault(tmp_path):
    """load_compressed(folder, model=MLP built with other sizes) blamed the folder: 'the folder was edited; re-run
    `svdlora compress`', or 'does not fit the model of config.json', a file a plain model's folder does not have."""
    model = MLP()
    compress(model, budget=0.5, include=["fc1"], progress=False)
    out = save_compressed(model, tmp_path / "mlp-svd")
    for layer, shape in (("fc1", (48, 32)), ("fc2", (40, 12))):  # a factorized layer, a dense one
        other = MLP()
        setattr(other, layer, torch.nn.Linear(*shape))
        with pytest.raises(SvdloraError, match=r"model= must be built as the compressed model was \(a MLP ") as err:
            load_compressed(out, device="cpu", model=other)
        assert "re-run" not in str(err.value) and "model of config.json" not in str(err.value)


def test_bf16_load_keeps_buffers_and_ties(tmp_path):
    model, out = compressed_folder("llama", tmp_path)
    loaded = load_compressed(out, device="cpu", dtype="bfloat16")
    rotary = dict(loaded.named_buffers())["model.rotary_emb.inv_freq"]
    assert rotary.dtype == torch.float32, "buffers built at construction keep their dtype, as in transformers"
    expected = output_of(model, "llama")
    assert torch.allclose(output_of(loaded, "llama").float(), expected, atol=0.1)


def test_a_reloaded_folder_saved_again_keeps_its_base_model(tmp_path):
    """Loading a folder and saving it again must record the original base model, not the folder
    it was loaded from (through load_compressed and through transformers' from_pretrained)."""
    import transformers

    import svdlora  # noqa: F401  (registers the quantizer)

    base = tmp_path / "base"
    TINY_MODELS["llama"]().save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "first")
    assert json.loads((tmp_path / "first" / CONFIG_NAME).read_text())["base_model"]["name_or_path"] == str(base)
    save_compressed(load_compressed(tmp_path / "first", device="cpu"), tmp_path / "again")
    save_compressed(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "first"), tmp_path / "via_hf")
    for folder in ("again", "via_hf"):
        recorded = json.loads((tmp_path / folder / CONFIG_NAME).read_text())["base_model"]["name_or_path"]
        assert recorded == str(base), folder
    save_compressed(load_compressed(tmp_path / "first", device="cpu"), tmp_path / "named", source="org/renamed-base")
    recorded = json.loads((tmp_path / "named" / CONFIG_NAME).read_text())["base_model"]["name_or_path"]
    assert recorded == "org/renamed-base"  # an explicit source= is what the user says the base is


def test_a_config_whose_dtype_does_not_fit_the_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert config["dtype"] == "float32"
    config["dtype"] = "float16"  # edited: the weights are float32
    (tmp_path / "out" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SvdloraError, match="says dtype 'float16' but the weights are stored as F32"):
        load_compressed(tmp_path / "out", device="cpu")


def test_a_folder_loaded_in_bfloat16_and_saved_again_reports_bfloat16_factors(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    before = read_report(tmp_path / "out").factorized
    save_compressed(load_compressed(tmp_path / "out", device="cpu", dtype=torch.bfloat16), tmp_path / "bf16")
    after = read_report(tmp_path / "bf16").factorized
    assert [m.stage_dtypes for m in before] == [["float32"] * len(m.ranks) for m in before]
    assert [m.stage_dtypes for m in after] == [["bfloat16"] * len(m.ranks) for m in after]
    for old, new in zip(before, after, strict=True):  # half the bytes: the pivot indices (int64) excepted
        assert new.dense_bytes * 2 == old.dense_bytes
        assert new.stored_bytes < old.stored_bytes and new.bits_per_weight < old.bits_per_weight


def test_errors_measured_before_a_cast_are_not_reported_for_the_cast_factors(tmp_path, capsys):
    """Found by review: a folder loaded in bfloat16 and saved again kept the float32 factors' errors,
    figures that are not those of the stored factors (W is not in the folder to measure them again)."""
    from svdlora.cli import main

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    compress(model, budget=0.5, svd_method="randomized", progress=False)  # with exact_error: the "vs exact" column
    save_compressed(model, tmp_path / "out")
    assert all(m.rel_error > 0 and m.exact_error is not None for m in read_report(tmp_path / "out").factorized)
    save_compressed(load_compressed(tmp_path / "out", device="cpu", dtype=torch.bfloat16), tmp_path / "bf16")
    saved = json.loads((tmp_path / "bf16" / CONFIG_NAME).read_text())["report"]["modules"]
    factorized = [m for m in saved if m.get("ranks")]
    assert factorized and all(m["rel_error"] is None and m["exact_error"] is None for m in factorized)
    assert main(["info", str(tmp_path / "bf16")]) == 0  # the folder loads and shows them as not measured
    text = capsys.readouterr().out
    assert "relative Frobenius error  not measured (factors cast to another dtype after compression)" in text
    assert all(line.split()[4:6] == ["n/a", "n/a"] for line in text.splitlines() if line.startswith("model.layers"))
    # saved again in the same dtype: still not measured
    save_compressed(load_compressed(tmp_path / "bf16", device="cpu"), tmp_path / "same")
    assert all(m.rel_error is None for m in read_report(tmp_path / "same").factorized)


def test_a_folder_with_errors_not_measured_is_written_in_the_format_that_allows_them(tmp_path):
    """svdlora before format 4 refuses a null rel_error as an edited file: such a folder says format 4,
    which an older svdlora refuses by its version ("uses svdlora format 4"); others keep their format."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "out")
    save_compressed(load_compressed(tmp_path / "out", device="cpu", dtype=torch.bfloat16), tmp_path / "bf16")
    for folder, version in (("out", 1), ("bf16", 4)):
        with safe_open(str(tmp_path / folder / WEIGHTS_NAME), framework="pt") as f:
            header = f.metadata()["svdlora_format_version"]
        config = json.loads((tmp_path / folder / "config.json").read_text())["quantization_config"]
        svd_config = json.loads((tmp_path / folder / CONFIG_NAME).read_text())
        assert (svd_config["format_version"], header, config["format_version"]) == (version, str(version), version)
    ids = example_inputs("llama")["input_ids"]
    with torch.no_grad():
        want = load_compressed(tmp_path / "bf16", device="cpu")(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")(ids).logits, want)


def test_the_error_summary_says_how_many_matrices_were_not_measured():
    from svdlora.report import CompressionReport, ModuleReport

    lines = [
        ModuleReport(f"l{i}", "linear", (8, 8), False, [2], ["float32"], error)
        for i, error in enumerate((0.1, 0.3, None))
    ]
    rows = dict(CompressionReport({}, lines, 0, 0).summary_rows())
    assert rows["relative Frobenius error"] == (
        "mean 0.2000, max 0.3000; not measured for 1 of 3 (factors cast to another dtype after compression)"
    )


def test_a_config_without_architecture_is_warned_about_once_per_folder(caplog):
    """The checks before a load and the load itself both ask for the class: one warning, not two."""
    import transformers

    from svdlora.models import model_class

    for path, expected in (("/x/no-architecture", 1), ("/x/no-architecture", 1), ("/y/another", 2)):
        config = transformers.GPT2Config(n_layer=1)
        config.name_or_path, config.architectures = path, None
        with caplog.at_level("WARNING", logger="svdlora.models"):
            assert model_class(config) is transformers.AutoModel
        assert caplog.text.count("names no known architecture") == expected


@pytest.mark.parametrize("pivot", [False, True])
def test_merge_precision_benchmark_measures_what_the_loader_builds(pivot, tmp_path):
    """benchmarks.merge_precision's 'rounded once' column is the error of load_compressed's merged bf16 weight."""
    from benchmarks import merge_precision

    _, out = compressed_folder("llama", tmp_path, pivot=pivot, submatrices=1)
    results = merge_precision.main([str(out), "--dtype", "bfloat16"])
    exact = load_compressed(out, device="cpu", merge=True).state_dict()
    narrow = load_compressed(out, device="cpu", merge=True, dtype=torch.bfloat16).state_dict()
    assert results
    for name, row in results.items():
        w = exact[f"{name}.weight"].double()
        measured = ((narrow[f"{name}.weight"].double() - w).norm() / w.norm()).item()
        assert row["product_rounded_once"] == pytest.approx(measured, rel=1e-3), name
        assert row["factors_rounded_first"] > 0


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
def test_float16_keeps_in_float32_the_layers_from_pretrained_keeps_there(merge, stored, tmp_path):
    """Found by review: T5's ``wo`` (``_keep_in_fp32_modules``: it overflows in float16) was loaded in
    float16 from a float32 folder with dtype=float16, and from a float16 folder (which stores it in
    float32, as compression in memory found it) as stored; from_pretrained of the dense model keeps it
    in float32."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    TINY_MODELS["t5"]().save_pretrained(tmp_path / "base")
    dense = T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16)
    source = T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=getattr(torch, stored))
    compress(source, budget=0.5, submatrices=2, progress=False)
    out = save_compressed(source, tmp_path / "out")
    loaded = load_compressed(out, device="cpu", dtype=torch.float16 if stored == "float32" else None, merge=merge)

    def in_float32(model):
        return {n.rpartition(".")[0] for n, p in model.named_parameters() if p.dtype == torch.float32}

    assert in_float32(loaded) == in_float32(dense) != set()
    assert isinstance(loaded.encoder.block[0].layer[1].DenseReluDense.wo, LowRankLinear) is not merge


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "float8"])
def test_a_dtype_it_cannot_compute_in_is_refused_by_name(dtype, tmp_path):
    """Found by review: a torch.dtype was taken unchecked (the strings were checked): torch.int8 failed the
    load as 'the folder was edited or mixed with another; re-run svdlora compress', float8 the first forward."""
    with pytest.raises(SvdloraError, match=r"dtype must be one of float32, float16, bfloat16, float64; got torch\."):
        load_compressed(compressed_folder("gpt2", tmp_path)[1], device="cpu", dtype=dtype)


@pytest.mark.parametrize("merge", [False, True], ids=["factorized", "merged"])
def test_the_folder_s_generation_config_is_the_one_generate_follows(merge, tmp_path):
    """Found by review: load_compressed built the model from config.json alone, so generate() ignored the
    folder's generation_config.json (a chat model's second end-of-turn token, its sampling defaults, a
    translator's beams and banned words), which from_pretrained of the same folder follows, and a folder
    loaded and saved again wrote the config.json-derived one."""
    import transformers

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    model.generation_config.update(eos_token_id=[0, 7], do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=11)
    compress(model, budget=0.5, progress=False)
    out = save_compressed(model, tmp_path / "out")
    loaded = load_compressed(out, device="cpu", merge=merge)
    assert loaded.generation_config.eos_token_id == [0, 7] and loaded.generation_config.temperature == 0.6
    expected = transformers.AutoModelForCausalLM.from_pretrained(out).generation_config
    assert loaded.generation_config.to_diff_dict() == expected.to_diff_dict()
    if not merge:  # and a folder saved again keeps it (it wrote the one config.json gave)
        again = save_compressed(loaded, tmp_path / "again")
        assert load_compressed(again, device="cpu").generation_config.eos_token_id == [0, 7]


def test_a_folder_loaded_in_bfloat16_says_so_in_its_config(tmp_path):
    """Found by review: load_compressed(dtype=bfloat16) left config.dtype float32 (from_pretrained sets the
    dtype it loads in), so a folder saved from it said float32 in config.json and from_pretrained's default
    dtype="auto" loaded its bfloat16 weights as float32."""
    import transformers

    _, out = compressed_folder("llama", tmp_path)
    loaded = load_compressed(out, device="cpu", dtype=torch.bfloat16)
    assert loaded.config.dtype == torch.bfloat16
    again = save_compressed(loaded, tmp_path / "again")
    assert transformers.AutoModelForCausalLM.from_pretrained(again).dtype == torch.bfloat16


def test_a_model_cast_after_loading_is_saved_with_its_dtype_in_its_config(tmp_path):
    """Found by review: load_compressed(folder).to(torch.bfloat16), saved, wrote bfloat16 factors under a
    config.json that still said float32, so from_pretrained loaded them back as float32 (save_pretrained
    records the dtype the weights have)."""
    import transformers

    _, out = compressed_folder("llama", tmp_path)
    cast = load_compressed(out, device="cpu").to(torch.bfloat16)
    again = save_compressed(cast, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(again).dtype == torch.bfloat16


@pytest.mark.parametrize("flag", ["merge", "stack_siblings"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_merge_and_stack_siblings_must_be_bools(tmp_path, flag, value):
    """merge="no" is truthy, so it merged (stack_siblings="no" stacked); 0 and None pass as False unnoticed."""
    _, out = compressed_folder("llama", tmp_path)
    with pytest.raises(SvdloraError, match=f"{flag} must be True or False"):
        load_compressed(out, device="cpu", **{flag: value})


def test_the_report_without_calibration_does_not_point_a_streamed_run_at_self():
    """The report does not know whether the run streamed; --stream and torchrun refuse 'self' (7594447)."""
    from svdlora.report import CompressionReport, ModuleReport

    line = ModuleReport("l", "linear", (8, 8), False, [2], ["float32"], 0.1)
    text = dict(CompressionReport({}, [line], 0, 0).summary_rows())["calibration"]
    assert "--calibration DATA" in text and "--stream and torchrun refuse 'self'" in text


def test_load_compressed_reads_a_home_relative_folder(tmp_path, monkeypatch):
    """load_compressed('~/svd') said the folder does not exist, though every CLI command expands a leading '~'."""
    model, out = compressed_folder("gpt2", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_compressed(f"~/{out.name}", device="cpu")
    assert torch.equal(output_of(loaded, "gpt2"), output_of(model, "gpt2"))


def test_save_compressed_writes_a_home_relative_folder_under_home(tmp_path, monkeypatch):
    """save_compressed(model, '~/svd') wrote a folder named '~' in the working directory, not under the home."""
    torch.manual_seed(0)
    model = TINY_MODELS["gpt2"]().eval()
    compress(model, progress=False, budget=0.5)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = save_compressed(model, "~/svd")
    assert out == tmp_path / "home" / "svd" and (out / CONFIG_NAME).is_file()
    assert not (tmp_path / "work" / "~").exists()
