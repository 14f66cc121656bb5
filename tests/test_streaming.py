"""Streamed compression: the same bytes as in-memory compression, shard by shard, with tied weights."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from svdlora import CompressionConfig, LowRankLinear, SvdloraError, compress, load_compressed, save_compressed
from svdlora.cli import main
from svdlora.errors import StreamingRefusal
from svdlora.io.writer import INDEX_NAME, TensorSpec, plan_shards
from svdlora.models import keep_in_fp32, load_pretrained
from svdlora.streaming import compress_checkpoint

from .conftest import example_inputs, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit


def tied_llama():
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if "safetensors" in p.name}


@pytest.mark.parametrize(
    ("make", "settings", "dtype"),
    [
        (tied_llama, {"budget": 0.5, "submatrices": 3}, None),
        (tiny_gpt2, {"rank": 4, "submatrices": 2}, None),  # Conv1D, head tied by default
        (tied_llama, {"budget": 0.4, "keep_head": False, "exclude": ["*.v_proj"]}, None),
        (tiny_gpt2, {"budget": 0.5}, "bfloat16"),
        (tied_llama, {"budget": 0.5, "submatrices": 2, "pivot": True}, None),  # svdlora.pivoted
        (tiny_gpt2, {"budget": 0.6, "pivot": True}, "bfloat16"),
        # saved in the layout transformers 5 renames at load (encoder.layer.N.attention.attention.query ->
        # layers.N.attention.q_proj): streaming found no tensor for the model's names
        (tiny_vit, {"budget": 0.5}, None),
    ],
)
def test_streamed_files_equal_in_memory_files(tmp_path, make, settings, dtype):
    base = tmp_path / "base"
    make().save_pretrained(base, max_shard_size="20KB")  # several input shards
    assert (base / INDEX_NAME).exists()
    config = CompressionConfig(**settings)

    model = load_pretrained(str(base), dtype=dtype)
    compress(model, config, progress=False)
    save_compressed(model, tmp_path / "memory", source=base, max_shard_size="30KB")
    compress_checkpoint(base, tmp_path / "stream", config, dtype=dtype, max_shard_size="30KB", progress=False)

    memory, stream = weight_bytes(tmp_path / "memory"), weight_bytes(tmp_path / "stream")
    assert len(memory) > 2 and INDEX_NAME in memory  # several output shards and an index
    assert memory == stream  # bit for bit
    # config.json too: its dtype is what from_pretrained(dtype="auto") loads the folder in
    assert (tmp_path / "memory" / "config.json").read_text() == (tmp_path / "stream" / "config.json").read_text()
    a = json.loads((tmp_path / "memory" / "svdlora_config.json").read_text())
    b = json.loads((tmp_path / "stream" / "svdlora_config.json").read_text())
    for data in (a, b):
        data["report"].pop("seconds")
    assert a == b

    loaded = load_compressed(tmp_path / "stream", device="cpu")
    with torch.no_grad():
        inputs = example_inputs("vit" if make is tiny_vit else "llama")
        got, want = loaded(**inputs).logits, model(**inputs).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("pivot", [False, True])
def test_keep_in_fp32_modules_stream_as_in_memory(tmp_path, pivot):
    # T5 keeps its feed-forward output `wo` in float32 under float16: streaming must not cast it, nor price
    # its pivot indices as float16 values (the budget counts 2 float32 values per index there, 4 elsewhere)
    base = tmp_path / "base"
    tiny_t5().half().save_pretrained(base)
    config = CompressionConfig(budget=0.5, pivot=pivot)
    model = load_pretrained(str(base), dtype="float16")
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    compress(model, config, progress=False)
    save_compressed(model, tmp_path / "memory", source=base)
    compress_checkpoint(base, tmp_path / "stream", config, dtype="float16", progress=False)
    assert weight_bytes(tmp_path / "memory") == weight_bytes(tmp_path / "stream")
    with safe_open(str(tmp_path / "stream" / "model.safetensors"), framework="pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith((".A", ".B", ".C", ".weight"))}
    assert {v for k, v in kinds.items() if ".wo." in k} == {"F32"}
    assert {v for k, v in kinds.items() if ".wo." not in k} == {"F16"}


def test_keep_in_fp32_follows_transformers_rule():
    model = torch.nn.Module()
    model._keep_in_fp32_modules, model._keep_in_fp32_modules_strict = ["wo"], ["mlp.gate.weight"]
    half, bf16 = keep_in_fp32(model, torch.float16), keep_in_fp32(model, torch.bfloat16)
    assert half("block.0.wo.weight") and half("layers.3.mlp.gate.weight") and not half("layers.3.mlp.up.weight")
    assert bf16("layers.3.mlp.gate.weight") and not bf16("block.0.wo.weight")  # only the strict list
    assert not keep_in_fp32(model, torch.float32)("block.0.wo.weight")


def test_tied_tensor_stored_once_across_shards(tmp_path):
    base = tmp_path / "base"
    tied_llama().save_pretrained(base, max_shard_size="20KB")
    out = compress_checkpoint(base, tmp_path / "out", budget=0.5, max_shard_size="30KB", progress=False)
    assert out.bytes_after > 0
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert "model.embed_tokens.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    first = tmp_path / "out" / sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(first), framework="pt") as f:
        assert json.loads(f.metadata()["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_cli_stream_and_shard_size(tmp_path, capsys):
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    args = ["compress", str(base), "--budget", "0.5", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "a"), "--max-shard-size", "25KB", "--calibration", "none"]) == 0
    capsys.readouterr()
    # the default --calibration auto cannot calibrate while streaming: plain SVD, said in one line
    assert main([*args, "-o", str(tmp_path / "b"), "--max-shard-size", "25KB", "--stream"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "plain SVD" in line]
    assert len(said) == 1 and "--stream" in said[0]
    assert weight_bytes(tmp_path / "a") == weight_bytes(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "svdlora_config.json").read_text())["world_size"] == 1
    assert main([*args, "-o", str(tmp_path / "c"), "--max-shard-size", "lots"]) == 2
    assert "max shard size" in capsys.readouterr().err


def test_stream_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(SvdloraError, match="local folder"):
        compress_checkpoint("org/some-model", tmp_path / "out", budget=0.5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SvdloraError, match="no weight files"):  # issue 7's dense-folder check, before the header
        compress_checkpoint(tmp_path / "empty", tmp_path / "out", budget=0.5)


def test_a_checkpoint_index_that_leaves_out_a_shard_is_refused_as_incomplete(tmp_path, capsys):
    """A dense checkpoint's index that names no tensor of one of its shards: its norms and embedding would be
    missing (in memory, transformers would initialize them at random); refused as incomplete, with the advice
    for a checkpoint, not a compressed folder's 're-run svdlora compress'."""
    tied_llama().save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    index = json.loads((tmp_path / "dense" / INDEX_NAME).read_text())
    left_out = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != left_out}
    (tmp_path / "dense" / INDEX_NAME).write_text(json.dumps(index))
    argv = ["compress", str(tmp_path / "dense"), "-o", str(tmp_path / "out"), "--stream", "--calibration", "none"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"names no tensor of ['{left_out}']" in err and "copy or download the checkpoint again" in err, err
    assert "svdlora compress`" not in err and not (tmp_path / "out").exists()


def test_shard_plan_follows_transformers_rule():
    specs = [TensorSpec(str(i), (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5])]  # 40, 40, 120, 20 bytes
    assert [[s.name for s in shard] for shard in plan_shards(specs, 80)] == [["0", "1"], ["2"], ["3"]]


@pytest.mark.parametrize("data", ["self", "text.txt"])
def test_stream_calibration_errors_are_one_line(tmp_path, capsys, data):
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    capsys.readouterr()  # save_pretrained's own progress bars
    (tmp_path / "text.txt").write_text("some calibration text\n")
    calibration = data if data == "self" else str(tmp_path / data)
    argv = ["compress", str(base), "-o", str(tmp_path / "o"), "--stream", "--calibration", calibration]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if data == "self":  # generating text needs the whole model
        assert "cannot be used with --stream" in err[0] and "--calibration none" in err[0]
    else:  # a text file streams block by block, with the model's tokenizer, missing here
        assert "tokenizer" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_calibrated_method_refuses_to_stream_in_one_line(tmp_path, capsys):
    """Not the plain-SVD fallback notice first and then the refusal: one line, the refusal."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    capsys.readouterr()  # save_pretrained's own progress bars
    argv = ["compress", str(base), "-o", str(tmp_path / "o"), "--stream", "--method", "whiten", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs calibration data" in err[0] and "--calibration DATA" in err[0]
    assert not (tmp_path / "o").exists()


def test_calibration_aware_settings_refuse_to_stream(tmp_path):
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    with pytest.raises(SvdloraError, match="--stage-dtypes cannot stream"):
        compress_checkpoint(base, tmp_path / "out", budget=0.5, stage_dtypes="int8")
    with pytest.raises(SvdloraError, match="cannot stream"):
        compress_checkpoint(base, tmp_path / "out", budget=0.5, method="kfac", refit=True, calibration=["text"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("calibration", [[], ["--calibration", "none"]], ids=["auto", "none"])
def test_a_streamed_refit_without_calibration_data_is_refused_not_dropped(tmp_path, capsys, calibration):
    """--stream --refit with the default --calibration auto streamed as plain SVD, recording refit: true
    where no refit ran; it is refused as with --calibration none, and as compress_checkpoint without data."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    capsys.readouterr()  # save_pretrained's own progress bars
    argv = ["compress", str(base), "-o", str(tmp_path / "o"), "--stream", "--refit", "--no-progress", *calibration]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the refit pass (--refit) needs calibration data" in err[0], err
    with pytest.raises(SvdloraError, match=r"the refit pass \(--refit\) needs calibration data"):
        compress_checkpoint(base, tmp_path / "o", budget=0.5, refit=True)
    assert not (tmp_path / "o").exists()


def test_a_streamed_refit_with_the_svd_method_is_said_unrun_as_in_memory(tmp_path, caplog):
    """--refit --method svd without data: in memory a warning says the refit is not run (it refits to weighted
    statistics); streamed the flag was dropped without a word. Both say it."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    with caplog.at_level("WARNING"):
        compress_checkpoint(base, tmp_path / "o", budget=0.5, method="svd", refit=True, progress=False)
    assert "the refit pass is not run with method 'svd'" in caplog.text, caplog.text


def _damaged(data: bytes) -> dict[str, bytes]:
    """Ways a safetensors file can be broken, each as the file's bytes."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    gap = dict(header)
    first = next(k for k in gap if k != "__metadata__")
    gap[first] = {**gap[first], "data_offsets": [gap[first]["data_offsets"][0] + 4, gap[first]["data_offsets"][1] + 4]}
    encoded = json.dumps(gap).encode()
    return {
        "truncated": data[:-1],
        "one byte more": data + b"\0",
        "header past the end": (len(data)).to_bytes(8, "little") + data[8:],
        "header not JSON": data[:8] + b"{" * length + data[8 + length :],
        "a gap before a tensor": len(encoded).to_bytes(8, "little") + encoded + data[8 + length :],
        "empty": b"",
    }


@pytest.mark.parametrize(
    "damage",
    ["truncated", "one byte more", "header past the end", "header not JSON", "a gap before a tensor", "empty"],
)
def test_headers_are_checked_as_safe_open_checks_them_without_a_memory_map(tmp_path, damage):
    from safetensors.torch import save_file

    from svdlora.io.checkpoint import read_header

    file = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(3, 2), "b": torch.arange(5), "c": torch.zeros(0)}, str(file), metadata={"k": "v"})
    tensors, metadata = read_header(file)
    with safe_open(str(file), framework="pt") as f:
        assert metadata == f.metadata() and set(tensors) == set(f.keys())
        assert all(list(f.get_slice(k).get_shape()) == list(tensors[k][1]) for k in f.keys())
    file.write_bytes(_damaged(file.read_bytes())[damage])
    with pytest.raises(Exception):  # noqa: B017, PT011  safetensors' own error types vary by version
        safe_open(str(file), framework="pt").keys()
    with pytest.raises(ValueError):
        read_header(file)


def test_valid_headers_that_torch_or_the_order_could_trip_on(tmp_path):
    """Dtypes beyond torch's common ones and zero-size tensors sharing an offset are valid files."""
    from safetensors.torch import save_file

    from svdlora.io.checkpoint import read_header
    from svdlora.models import check_dense_folder

    file = tmp_path / "model.safetensors"
    save_file({"u": torch.arange(6).to(torch.uint32), "w": torch.ones(2, 3)}, str(file))
    (tmp_path / "config.json").write_text("{}")
    check_dense_folder(tmp_path, "m")  # no refusal
    assert read_header(file)[0]["u"][:2] == ("U32", (6,))
    header = {"b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    header["a"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}  # listed after, same start
    encoded = json.dumps(header).encode()
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(16))
    with safe_open(str(file), framework="pt") as f:
        assert set(f.keys()) == {"a", "b"}
    assert set(read_header(file)[0]) == {"a", "b"}


def cached_as_hub_id(folder: Path, tmp_path: Path, monkeypatch) -> str:
    """``folder`` put in a Hugging Face cache (under ``tmp_path``, offline) as the hub id 'org/tiny'."""
    import shutil

    import huggingface_hub.constants

    commit, repo = "0123456789abcdef0123456789abcdef01234567", tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "org/tiny"


def test_a_hub_id_streams_from_its_snapshot(tmp_path, monkeypatch, capsys):
    """A hub id is read from its snapshot in the Hugging Face cache (offline here; online it is
    downloaded first), recorded as the base model, and sized for the memory check when cached."""
    from svdlora import memory

    base = tmp_path / "base"
    tied_llama().save_pretrained(base, max_shard_size="20KB")
    cached_as_hub_id(base, tmp_path, monkeypatch)
    flags = ["--budget", "0.5", "--calibration", "none", "--no-progress"]
    assert main(["compress", str(base), *flags, "--stream", "-o", str(tmp_path / "local")]) == 0
    assert main(["compress", "org/tiny", *flags, "--stream", "-o", str(tmp_path / "hub-id")]) == 0
    assert weight_bytes(tmp_path / "local") == weight_bytes(tmp_path / "hub-id")
    recorded = json.loads((tmp_path / "hub-id" / "svdlora_config.json").read_text())["base_model"]
    assert recorded["name_or_path"] == "org/tiny"
    capsys.readouterr()
    monkeypatch.setattr(memory, "limits", lambda with_swap=False: {"available memory": 1000})
    assert main(["compress", "org/tiny", *flags, "-o", str(tmp_path / "by-itself")]) == 0  # cached: sized
    assert "streaming it instead" in capsys.readouterr().err
    assert main(["compress", "org/not-cached", *flags, "--stream", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in the local cache" in err[0], err


@pytest.mark.parametrize(
    "flags",
    [
        ["--stream", "--calibration", "none"],
        [
            "--calibration",
            "text",
            "--calibration-samples",
            "2",
            "--calibration-length",
            "16",
        ],  # the memory check's plan
    ],
)
def test_compress_eval_of_a_hub_id_builds_its_meta_model_once(tmp_path, monkeypatch, flags):
    """compress HUB_ID --eval built the hub id's meta model for the --eval checks (from the id), then the plan
    (streamed, or the memory check's with a calibration) built another from the snapshot folder, as the first was
    not built from the folder it reads: the first is built from the snapshot of its side files, and taken over."""
    from .eval_helpers import count_loads, lm_folder

    remote, text = lm_folder(tmp_path)
    name = cached_as_hub_id(remote, tmp_path, monkeypatch)
    calls = count_loads(monkeypatch)
    flags = [str(text) if flag == "text" else flag for flag in flags]
    out = tmp_path / "out"
    argv = ["compress", name, "-o", str(out), "--eval", str(text), "--eval-limit", "2", "--no-progress", *flags]
    assert main(argv) == 0
    assert len(calls["skeleton"]) == 1, calls["skeleton"]
    assert "perplexity" in (out / "README.md").read_text()


def test_compress_eval_of_a_hub_id_without_its_weights_in_the_cache_is_checked_on_its_config(
    tmp_path, monkeypatch, capsys
):
    """A hub id whose snapshot lacks the weights (a cache with its config only) has its --eval checked on its
    config alone, not skipped for want of a whole snapshot: a BERT is refused ('drop --eval') before the run."""
    from .conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").unlink()
    (tmp_path / "text.txt").write_text("a b c " * 20)
    name = cached_as_hub_id(tmp_path / "bert", tmp_path, monkeypatch)
    argv = ["compress", name, "--stream", "--calibration", "none", "--eval", str(tmp_path / "text.txt")]
    assert main([*argv, "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "drop --eval" in capsys.readouterr().err and not (tmp_path / "out").exists()


DAMAGED_INDEXES = [
    lambda index: "{",  # not JSON: 'cannot be read', without the local folder's remedy
    lambda index: {"weight_map": {key: [shard] for key, shard in index["weight_map"].items()}},  # TypeError
    lambda index: {"weight_map": {key: f"../{shard}" for key, shard in index["weight_map"].items()}},  # 'has no'
]
DAMAGE_IDS = ["not JSON", "lists for shard names", "shards outside the folder"]


@pytest.mark.parametrize("damage", DAMAGED_INDEXES, ids=DAMAGE_IDS)
def test_a_hub_snapshot_s_damaged_index_is_refused_as_a_local_folder_s(tmp_path, monkeypatch, capsys, damage):
    """The hub snapshot's index was parsed apart from the local folder's checks (``io.writer.weight_files``): it
    said 'cannot be read' without the remedy, crashed on a list where a shard name goes, and asked the cache for a
    shard outside the snapshot. Both are now refused in the same line, before any weight is downloaded."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base, max_shard_size="20KB")
    index = base / INDEX_NAME
    damaged = damage(json.loads(index.read_text()))
    index.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    name = cached_as_hub_id(base, tmp_path, monkeypatch)
    snapshot = next((tmp_path / "hub" / "models--org--tiny" / "snapshots").iterdir())
    capsys.readouterr()
    refusals = []
    for model, folder in ((str(base), base), (name, snapshot)):
        argv = ["compress", model, "--stream", "--calibration", "none", "--no-progress", "-o", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        refusals.append(err[0].replace(str(folder), "FOLDER"))
    assert refusals[0] == refusals[1] and "FOLDER/model.safetensors.index.json is corrupted" in refusals[0]
    assert refusals[0].endswith("copy or download the checkpoint again")


@pytest.mark.parametrize("damage", DAMAGED_INDEXES, ids=DAMAGE_IDS)
def test_a_damaged_index_is_refused_in_memory_as_streamed(tmp_path, capsys, damage):
    """The in-memory load (``models.load_pretrained``) left a local folder's index to transformers, which crashed
    on a list where a shard name goes (an internal TypeError, exit 1) and said only 'cannot load the weights'
    of the others: it is now refused in the line a streamed run gives."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base, max_shard_size="20KB")
    index = base / INDEX_NAME
    damaged = damage(json.loads(index.read_text()))
    index.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    capsys.readouterr()
    refusals = []
    for mode in ("--no-stream", "--stream"):
        argv = ["compress", str(base), mode, "--calibration", "none", "--no-progress", "-o", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        refusals.append(err[0])
    assert refusals[0] == refusals[1] and "model.safetensors.index.json is corrupted" in refusals[0]


def test_the_hub_functions_tell_a_folder_another_path_and_a_hub_id_alike(tmp_path, monkeypatch):
    """local_checkpoint, side_folder and remote_parameters each wrote the folder / path / hub id test (one now)."""
    import huggingface_hub

    from svdlora import hub

    asked: list[str] = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub, "_snapshot", lambda repo_id, *args: asked.append(repo_id) or tmp_path)
    monkeypatch.setattr(hub, "_download", lambda repo_id, *args: asked.append(repo_id) or tmp_path)
    monkeypatch.setattr(
        huggingface_hub, "get_safetensors_metadata", lambda *a, **k: type("M", (), {"parameter_count": {}})
    )
    (tmp_path / "file").write_text("")
    assert hub.local_checkpoint(tmp_path) == hub.side_folder(tmp_path) == tmp_path
    for path in (tmp_path / "file", "./missing", "~/missing"):
        with pytest.raises(SvdloraError, match="is not a folder"):
            hub.local_checkpoint(path)
        assert hub.side_folder(path) is None
    for path in (tmp_path, tmp_path / "file", "./missing"):
        assert hub.remote_parameters(path) is None
    assert not asked
    assert hub.local_checkpoint("org/m") == hub.side_folder("org/m") == hub.remote_parameters("org/m")[0] == tmp_path
    assert asked == ["org/m"] * 3


def test_the_hub_snapshot_takes_top_level_side_files_and_the_index_s_shards():
    from huggingface_hub.utils import filter_repo_objects

    from svdlora.hub import SIDE_FILES

    files = ["config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json", "README.md"]
    files += ["onnx/config.json", "original/params.json", "consolidated.safetensors", "pytorch_model.bin"]
    chosen = set(filter_repo_objects(files, allow_patterns=SIDE_FILES))
    assert chosen == {"config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"}


def test_under_torchrun_rank_0_resolves_a_hub_id_and_the_others_take_its_commit(monkeypatch, tmp_path):
    from svdlora.streaming import pipeline

    class Rank1:
        is_main = False

        def __init__(self, answer):
            self.answer = answer

        def broadcast(self, _):
            return self.answer

    asked = []
    monkeypatch.setattr(pipeline, "local_checkpoint", lambda *a, **k: asked.append(k) or tmp_path)
    with pytest.raises(SvdloraError, match="no such model"):  # rank 0's refusal, on every rank
        pipeline._local_folder("org/m", False, Rank1(("refused", SvdloraError("no such model"))))
    sent = pickle.loads(pickle.dumps(StreamingRefusal("{repo!r} has no model.safetensors: {in_memory}", repo="{m}")))
    with pytest.raises(StreamingRefusal) as refused:  # as a broadcast pickles it: still the CLI's to reword
        pipeline._local_folder("org/m", False, Rank1(("refused", sent)))
    assert str(refused.value.reworded("one way")) == "'{m}' has no model.safetensors: one way"
    assert pipeline._local_folder("org/m", False, Rank1(("folder", str(tmp_path)))) == tmp_path and not asked
    other_node = str(tmp_path / "not-here" / "snapshots" / "0123abc")  # rank 0's cache is not on this node
    assert pipeline._local_folder("org/m", False, Rank1(("folder", other_node))) == tmp_path
    assert asked == [{"revision": "0123abc"}]


def test_a_config_that_names_no_known_class_compresses_by_default(tmp_path):
    """AutoModel is built with from_config on the meta device (a plan used to fail on AutoModel(config))."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)  # fmt: skip
    LlamaModel(config).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    saved.pop("architectures", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    assert main(["compress", str(tmp_path / "m"), "--budget", "0.5", "--no-progress", "-o", str(tmp_path / "a")]) == 0
    argv = ["compress", str(tmp_path / "m"), "--budget", "0.5", "--no-progress", "--stream", "-o", str(tmp_path / "b")]
    assert main(argv) == 0
    assert weight_bytes(tmp_path / "a") == weight_bytes(tmp_path / "b")


def test_a_rank_that_factorizes_nothing_is_refused_as_in_memory(tmp_path, capsys):
    """--rank too large for every layer: in memory the CLI refuses to write a copy; streamed it wrote one."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    capsys.readouterr()
    for mode in ("--no-stream", "--stream"):
        argv = ["compress", str(base), "-o", str(tmp_path / mode), "--rank", "100", "--calibration", "none", mode]
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "factorizes none" in err[0], err
        assert not (tmp_path / mode).exists()


def test_a_rank_that_factorizes_nothing_counts_the_targeted_layers_in_memory_as_streamed(tmp_path, capsys):
    """In memory the refusal counted every Linear of the report (15: the excluded MLPs and the head kept dense
    too), as if a rank had been tried on them; streamed it counts the targets (8). Both count the targets."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    capsys.readouterr()
    lines = []
    for mode in ("--no-stream", "--stream"):
        argv = ["compress", str(base), "-o", str(tmp_path / mode), "--rank", "100", "--exclude", "*.mlp.*", mode]
        assert main([*argv, "--calibration", "none", "--no-progress"]) == 2
        lines.append(capsys.readouterr().err.strip())
    assert lines[0] == lines[1] and "factorizes none of the 8 Linear/Conv1D layers" in lines[0], lines


def test_a_checkpoint_without_a_config_dtype_loads_in_its_first_tensor_s_dtype(tmp_path):
    """from_pretrained(dtype="auto") without a dtype in config.json casts every floating tensor to the
    first one's dtype (and records it in config.json); streaming kept each tensor's stored dtype."""
    base = tmp_path / "base"
    model = tiny_llama()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)  # the norms and the embedding stay float32
    model.save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps(config))
    flags = ["--budget", "0.5", "--calibration", "none", "--no-progress"]
    assert main(["compress", str(base), "-o", str(tmp_path / "memory"), *flags, "--no-stream"]) == 0
    assert main(["compress", str(base), "-o", str(tmp_path / "stream"), *flags, "--stream"]) == 0
    assert weight_bytes(tmp_path / "memory") == weight_bytes(tmp_path / "stream")
    saved = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("memory", "stream")]
    assert saved[0] == saved[1] and saved[1]["dtype"] == "bfloat16"


@pytest.mark.parametrize("head", [[], ["--compress-head"]])  # the head stays dense (copied), or is factorized
def test_weights_that_do_not_fit_config_json_are_refused_as_in_memory(tmp_path, capsys, head):
    """Streaming copied a stored tensor in its stored shape: a complete-looking folder that did not load
    (or, for a factorized matrix, an internal error midway); in memory it is refused, naming the tensor."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)  # untied head, vocabulary 96
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = 100
    (base / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    for mode in ("--no-stream", "--stream"):
        argv = ["compress", str(base), "-o", str(tmp_path / mode), "--budget", "0.5", "--calibration", "none", mode]
        assert main([*argv, *head, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "has shape [96, 32] but LlamaForCausalLM needs" in err and "do not match" in err, err
        assert not (tmp_path / mode).exists()


def test_a_checkpoint_transformers_merges_at_load_is_refused_in_one_line(tmp_path, capsys):
    """transformers 5 merges a Mixtral checkpoint's per-expert tensors into one at load (a WeightConverter), which
    streaming cannot do tensor by tensor: refused, naming the tensor and the way out; in memory it compresses."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    capsys.readouterr()
    args = ["compress", str(tmp_path / "moe"), "--calibration", "none", "--no-progress", "-o"]
    assert main([*args, str(tmp_path / "stream"), "--stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experts.0.w1.weight' in a layout transformers converts" in err[0], err
    assert err[0].endswith(": drop --stream") and not (tmp_path / "stream").exists()
    assert main([*args, str(tmp_path / "memory")]) == 0


def test_a_rename_onto_a_name_the_checkpoint_also_holds_follows_transformers(tmp_path, monkeypatch):
    """kimi_k25's mapping shifts names (vision blocks' norm0 -> norm1, norm1 -> norm2): transformers loads the
    checkpoint's norm0 into the model's norm1, but streaming took the checkpoint's own norm1 (norm2's weights)."""
    import transformers.conversion_mapping as conversion_mapping
    from safetensors.torch import save_file
    from transformers.core_model_loading import GroupWeightRename

    from svdlora.io.checkpoint import Checkpoint

    shift = GroupWeightRename(
        source_patterns=[r"blocks.(\d+).norm0", r"blocks.(\d+).norm1"],
        target_patterns=[r"blocks.\1.norm1", r"blocks.\1.norm2"],
    )
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: [shift])
    save_file({f"blocks.0.norm{i}.weight": torch.full((4,), float(i)) for i in (0, 1)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    ckpt.follow_renames(torch.nn.Module())
    assert ckpt.resolve("blocks.0.norm1.weight", "") == "blocks.0.norm0.weight"
    assert ckpt.resolve("blocks.0.norm2.weight", "") == "blocks.0.norm1.weight"


def test_renames_follow_the_checkpoint_in_transformers_order_not_its_shards(tmp_path, monkeypatch):
    """A GroupWeightRename renames only once its first pattern (norm0) was seen, in the order transformers
    sorts the keys: a checkpoint whose first shard holds norm1 left norm1 unrenamed, so norm2 had no tensor."""
    import transformers.conversion_mapping as conversion_mapping
    from safetensors.torch import save_file
    from transformers.core_model_loading import GroupWeightRename

    from svdlora.io.checkpoint import Checkpoint

    shift = GroupWeightRename(
        source_patterns=[r"blocks.(\d+).norm0", r"blocks.(\d+).norm1"],
        target_patterns=[r"blocks.\1.norm1", r"blocks.\1.norm2"],
    )
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: [shift])
    shards = {"a.safetensors": "blocks.0.norm1.weight", "b.safetensors": "blocks.0.norm0.weight"}
    for file, key in shards.items():
        save_file({key: torch.zeros(4)}, tmp_path / file)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {key: file for file, key in shards.items()}}))
    ckpt = Checkpoint(tmp_path)
    ckpt.follow_renames(torch.nn.Module())
    assert ckpt.resolve("blocks.0.norm1.weight", "") == "blocks.0.norm0.weight"
    assert ckpt.resolve("blocks.0.norm2.weight", "") == "blocks.0.norm1.weight"


def test_a_converted_tensor_refuses_only_the_weight_it_fills_and_two_renamed_onto_one_are_refused(
    tmp_path, monkeypatch
):
    """follow_renames refused the whole checkpoint if any key matched a WeightConverter, even one the model does
    not need; and of two checkpoint tensors renamed onto one name, the later silently won. Now a weight filled
    by converting tensors, or from two, is refused where the run needs it, naming the checkpoint's tensors."""
    import transformers.conversion_mapping as conversion_mapping
    from safetensors.torch import save_file
    from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

    from svdlora.errors import SvdloraError
    from svdlora.io.checkpoint import Checkpoint

    fuse = WeightConverter(["extra.w1", "extra.w3"], "extra.fused", operations=[Concatenate(dim=0)])
    both = WeightRenaming(source_patterns=r"norm_(a|b)\.", target_patterns="norm.")
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: [both, fuse])
    keys = ["blocks.0.linear.weight", "extra.w1", "extra.w3", "blocks.0.norm_a.weight", "blocks.0.norm_b.weight"]
    save_file({key: torch.full((4,), float(i)) for i, key in enumerate(keys)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    ckpt.follow_renames(torch.nn.Module())
    assert ckpt.resolve("blocks.0.linear.weight", "") == "blocks.0.linear.weight"  # the checkpoint is usable
    with pytest.raises(SvdloraError, match="stores 'extra.w1' in a layout transformers converts"):
        ckpt.resolve("extra.fused", "")
    with pytest.raises(SvdloraError, match="both 'blocks.0.norm_a.weight' and 'blocks.0.norm_b.weight'"):
        ckpt.resolve("blocks.0.norm.weight", "")


def test_a_refused_tied_name_gives_way_to_a_later_one_the_checkpoint_stores(tmp_path, monkeypatch):
    """A tied weight is read under any of its names; where the first (the embedding, here stored as two
    tensors transformers renames onto it: refused) could not be read, the run stopped there, though the
    checkpoint also stores the weight under a later name (the head): it is now read from that one."""
    import transformers.conversion_mapping as conversion_mapping
    from safetensors.torch import load_file, save_file
    from transformers.core_model_loading import WeightRenaming

    config = CompressionConfig(budget=0.5)
    tied_llama().save_pretrained(tmp_path / "base")
    compress_checkpoint(tmp_path / "base", tmp_path / "plain", config, progress=False)
    both = WeightRenaming(source_patterns=r"embed_(a|b)\.", target_patterns="embed_tokens.")
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: [both])
    tensors = load_file(tmp_path / "base" / "model.safetensors")
    embedding = tensors.pop("model.embed_tokens.weight")
    tensors |= {name: embedding.clone() for name in ("model.embed_a.weight", "model.embed_b.weight", "lm_head.weight")}
    save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    compress_checkpoint(tmp_path / "base", tmp_path / "renamed", config, progress=False)
    assert weight_bytes(tmp_path / "renamed") == weight_bytes(tmp_path / "plain")

    del tensors["lm_head.weight"]  # no other name: the refusal stands
    save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SvdloraError, match="both 'model.embed_a.weight' and 'model.embed_b.weight'"):
        compress_checkpoint(tmp_path / "base", tmp_path / "none", config, progress=False)


def test_a_bad_shard_size_is_refused_before_the_calibration_is_read(tmp_path, monkeypatch):
    import svdlora.streaming.pipeline as pipeline

    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    monkeypatch.setattr(pipeline, "_calibration_batches", lambda *a, **k: pytest.fail("calibration read first"))
    config = CompressionConfig(budget=0.5, method="whiten")
    with pytest.raises(SvdloraError, match="max shard size"):
        compress_checkpoint(base, tmp_path / "out", config, calibration="text.txt", max_shard_size="lots")
    assert not (tmp_path / "out").exists()


def test_a_planned_tensor_left_unwritten_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    import svdlora.streaming.pipeline as pipeline

    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    run_jobs = pipeline.run_jobs
    monkeypatch.setattr(pipeline, "run_jobs", lambda jobs, *a, **k: run_jobs(jobs[1:], *a, **k))  # one job lost
    with pytest.raises(RuntimeError, match="never written"):
        compress_checkpoint(base, tmp_path / "out", budget=0.5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # neither the folder nor its temporary copy


def test_a_plan_hands_its_meta_model_back_as_built_for_another_allocation(tmp_path):
    """A global allocation plans again with its ranks, on the first plan's meta model (Plan.unswapped) rather than a
    new one: the dense layers are back and a factorized head is tied again in the config, so a re-plan that keeps
    the head dense writes it tied, as a plan on a fresh build does."""
    from svdlora.streaming import plan

    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    config = CompressionConfig(budget=0.5, keep_head=False)
    first = plan(base, config)
    assert isinstance(first.model.lm_head, LowRankLinear) and not first.hf_config.tie_word_embeddings
    allocation = ({t.name: [2] for t in first.targets if t.name != "lm_head"}, {"lm_head": "kept dense"})
    fresh = plan(base, config, allocation=allocation)
    again = plan(base, config, allocation=allocation, model=first.unswapped())
    assert again.model is first.model and again.hf_config.tie_word_embeddings
    assert (again.specs, again.tied, str(again.model)) == (fresh.specs, fresh.tied, str(fresh.model))
    assert [j[:2] for j in again.jobs] == [j[:2] for j in fresh.jobs]


def test_a_meta_model_built_from_another_folder_is_not_taken_over(tmp_path):
    """A plan takes a meta model already built over (model=) only where it was built from the folder it plans: a hub
    id's memory check may have read an older cached snapshot, whose config the streamed run would have written."""
    from svdlora.streaming import plan

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "old")
    newer = tiny_llama()
    newer.config.rms_norm_eps = 1e-3  # the same shapes, another config
    newer.save_pretrained(tmp_path / "new")
    config = CompressionConfig(budget=0.5)
    old = plan(tmp_path / "old", config).unswapped()
    p = plan(tmp_path / "new", config, model=old)
    assert p.model is not old and p.hf_config.rms_norm_eps == 1e-3
    assert plan(tmp_path / "old", config, model=old).model is old  # its own folder's: taken over


@pytest.mark.parametrize("file", ["unreadable", "missing"])
def test_an_unreadable_generation_config_streams_as_in_memory(tmp_path, capsys, file):
    """The streamed run read the checkpoint's generation_config.json with its own copy of io's reader, which
    raised on a bad file: the run failed after every matrix was written ('... is not a valid JSON file.:
    nothing was written'); it reads through io.generation_config and writes the config.json-derived one that
    from_pretrained, and so the in-memory run, falls back to. A missing file falls back alike: generation
    settings kept in config.json (older checkpoints: num_beams, max_length) were dropped when streamed."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    if file == "unreadable":
        (base / "generation_config.json").write_text("{not json")
    else:
        (base / "generation_config.json").unlink()
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "num_beams": 4, "max_length": 77}))
    for mode in ("--no-stream", "--stream"):
        argv = ["compress", str(base), "-o", str(tmp_path / mode), "--budget", "0.5", "--calibration", "none", mode]
        assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    memory, stream = ((tmp_path / m / "generation_config.json").read_text() for m in ("--no-stream", "--stream"))
    assert memory == stream and '"_from_model_config": true' in stream
