"""Streamed calibration, one decoder block at a time: the same bytes as in-memory calibration."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache

from svdlora import (
    CompressionConfig,
    SvdloraError,
    block_gradients,
    blockwise,
    compress,
    load_compressed,
    save_compressed,
)
from svdlora.blockwise import find_blocks
from svdlora.cli import main
from svdlora.distributed import Context
from svdlora.models import load_pretrained
from svdlora.streaming import compress_checkpoint

from .conftest import tiny_gpt2, tiny_llama, tiny_t5
from .eval_helpers import word_text, word_tokenizer
from .test_streaming import weight_bytes

WORDS = "the a cat dog sat on mat ran far and then it was good bad big small red blue".split()


@pytest.fixture(params=["llama", "gpt2"])
def base(request, tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    if request.param == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # several input shards
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
    return tmp_path / "base"


def same_in_memory_and_streamed(base, config: CompressionConfig):
    """Compress ``base`` in memory (saved to tmp/memory) and streamed (tmp/stream) on its text;
    assert the weight files and reports are equal; return the in-memory model and the report."""
    tmp = base.parent
    text = str(tmp / "text.txt")
    model = load_pretrained(str(base))
    compress(model, config, calibration=text, processor=word_tokenizer(WORDS), progress=False)
    save_compressed(model, tmp / "memory", source=base, max_shard_size="30KB")
    compress_checkpoint(base, tmp / "stream", config, calibration=text, max_shard_size="30KB", progress=False)
    assert weight_bytes(tmp / "memory") == weight_bytes(tmp / "stream")  # bit for bit
    a, b = (json.loads((tmp / f / "svdlora_config.json").read_text()) for f in ("memory", "stream"))
    for data in (a, b):
        data["report"].pop("seconds")
    assert a == b
    return model, b["report"]


@pytest.mark.parametrize("pivot", [False, True])
def test_blockwise_calibration_equals_in_memory_whitening(base, pivot):
    tmp = base.parent
    config = CompressionConfig(
        budget=0.5, submatrices=2, method="whiten", allocation="uniform", pivot=pivot,
        calibration_samples=3, calibration_length=16,
    )  # fmt: skip
    model, report = same_in_memory_and_streamed(base, config)
    assert report["method"] == "whiten" and report["calibration"]["batches"] == 3

    # and it is calibrated: not the plain SVD's factors
    compress_checkpoint(base, tmp / "plain", CompressionConfig(budget=0.5, submatrices=2, pivot=pivot), progress=False)
    assert weight_bytes(tmp / "plain") != weight_bytes(tmp / "stream")
    loaded = load_compressed(tmp / "stream", device="cpu")
    ids = word_tokenizer(WORDS)(word_text(WORDS, 12), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("method", "allocation", "pivot"),
    [("kfac", "global", True), ("fisher", "uniform", False), ("whiten", "global", False), ("svd", "global", True)],
)
def test_gradient_methods_stream_block_by_block_as_in_memory(base, method, allocation, pivot):
    """Fisher / K-FAC weights and global allocation from a backward pass run block by block: the
    same bytes and report as the whole model's backward in memory, and no scratch file left."""
    tmp = base.parent
    text = str(tmp / "text.txt")
    config = CompressionConfig(
        budget=0.5, submatrices=2, method=method, allocation=allocation, pivot=pivot,
        calibration_samples=3, calibration_length=16,
    )  # fmt: skip
    _, report = same_in_memory_and_streamed(base, config)
    assert (report["method"], report["allocation"], report["calibration"]["gradients"]) == (method, allocation, True)
    if allocation == "global":  # the ranks came from the loss-weighted spectra
        assert all(m["est_loss"] is not None for m in report["modules"] if m.get("ranks"))
    assert sorted(p.name for p in (tmp / "stream").iterdir()) == sorted(p.name for p in (tmp / "memory").iterdir())
    assert list(tmp.glob(".*svdlora*")) == []  # the scratch went with the temporary folder

    whitened = CompressionConfig(**{**config.to_dict(), "method": "whiten", "allocation": "uniform"})
    compress_checkpoint(base, tmp / "whiten", whitened, calibration=text, max_shard_size="30KB", progress=False)
    assert weight_bytes(tmp / "whiten") != weight_bytes(tmp / "stream")


@pytest.mark.parametrize("method", ["kfac", "fisher"])
def test_targets_in_the_last_block_only_stream_as_in_memory(base, method):
    """--include of the last block's layers: the first block, with no target and no block before it,
    took a gradient of nothing (autograd.grad's 'inputs argument cannot be empty', as a bug in svdlora)."""
    config = CompressionConfig(
        budget=0.5, method=method, include=["*.1.*"], calibration_samples=2, calibration_length=16
    )  # fmt: skip
    _, report = same_in_memory_and_streamed(base, config)
    factorized = [m["name"] for m in report["modules"] if m.get("ranks")]
    assert factorized and all(".1." in name for name in factorized), factorized


def test_a_named_device_runs_the_block_passes_there(base, monkeypatch):
    """--device names where the block passes run (a GPU for real: benchmarks/gpu_calibration.py);
    here the CPU, named: every block is read onto it, and the bytes stay in-memory's."""
    seen = []
    materialize = blockwise._materialize

    def recording(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return materialize(*args, **kwargs)

    monkeypatch.setattr(blockwise, "_materialize", recording)
    config = CompressionConfig(
        budget=0.5, method="kfac", allocation="global", svd_device="cpu", calibration_samples=3, calibration_length=16
    )
    same_in_memory_and_streamed(base, config)
    assert seen and set(seen) == {"cpu"}


def test_cli_streams_the_in_memory_default(base, capsys):
    """--stream --calibration DATA with the default method and allocation (kfac/fisher + global)
    writes what the in-memory CLI writes."""
    tmp = base.parent
    argv = ["compress", str(base), "--budget", "0.5", "--no-progress", "--calibration", str(tmp / "text.txt")]
    argv += ["--calibration-samples", "2", "--calibration-length", "16"]
    assert main([*argv, "--stream", "-o", str(tmp / "stream")]) == 0
    assert main([*argv, "-o", str(tmp / "memory")]) == 0
    assert weight_bytes(tmp / "memory") == weight_bytes(tmp / "stream")
    report = json.loads((tmp / "stream" / "svdlora_config.json").read_text())["report"]
    assert (report["method"], report["allocation"]) == ("kfac", "global")


def test_global_allocation_may_factorize_what_the_uniform_plan_keeps_dense(base):
    """At budget 1.0 the uniform plan keeps square matrices dense (their factors would not be
    smaller); their spectra are still needed, and the global allocation may factorize them."""
    config = CompressionConfig(
        budget=1.0, method="fisher", allocation="global", calibration_samples=2, calibration_length=16
    )
    same_in_memory_and_streamed(base, config)


@pytest.mark.parametrize(("flags", "pinned"), [([], False), (["--method", "whiten", "--allocation", "uniform"], True)])
def test_only_streamed_whitening_pins_the_mmap_threshold(base, monkeypatch, flags, pinned):
    """Pinning halved streamed whitening's peak; with gradients it saved 7% for 26% more time."""
    calls = []
    monkeypatch.setattr(blockwise, "pin_mmap_threshold", lambda: calls.append(1))
    tmp = base.parent
    argv = ["compress", str(base), "--stream", "--no-progress", "--calibration", str(tmp / "text.txt")]
    assert main([*argv, "--calibration-samples", "2", *flags, "-o", str(tmp / "o")]) == 0
    assert bool(calls) == pinned


def test_a_failed_backward_leaves_no_output_and_no_scratch(base, monkeypatch):
    tmp = base.parent
    seen = {}

    def fail(block, targets, inputs, masks, grads, hidden_file, *rest):
        seen["scratch"] = hidden_file.parent
        assert hidden_file.exists() and len(list(hidden_file.parent.glob("hidden-*.pt"))) == 2  # both blocks' inputs
        raise SvdloraError("stopped in the backward pass")

    monkeypatch.setattr(block_gradients, "_block_backward", fail)
    config = CompressionConfig(budget=0.5, method="kfac", allocation="global", calibration_samples=2)
    with pytest.raises(SvdloraError, match="stopped in the backward pass"):
        compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    assert not (tmp / "o").exists() and not seen["scratch"].exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "text.txt"]


def test_a_disk_too_small_for_the_hidden_states_is_refused(base, monkeypatch):
    tmp = base.parent
    usage = shutil.disk_usage(tmp)
    monkeypatch.setattr(block_gradients.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    config = CompressionConfig(budget=0.5, method="fisher", allocation="uniform", calibration_samples=2)
    with pytest.raises(SvdloraError, match="stores every block's inputs"):
        compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "text.txt"]


def test_every_rank_refuses_when_one_rank_lacks_the_disk(tmp_path):
    """A rank left to run alone would wait for the others at the first block: all refuse together."""

    class OtherRankRefuses:
        active, world_size = True, 2

        def gather(self, refusal):
            return [refusal, "rank 1: not enough disk"]

    with pytest.raises(SvdloraError, match="rank 1: not enough disk"):
        block_gradients._check_space(tmp_path, [], [], "fisher", [], OtherRankRefuses())
    block_gradients._check_space(tmp_path, [], [], "fisher", [], Context())  # this rank's own disk suffices


@pytest.mark.parametrize(
    ("method", "exclude"), [("kfac", []), ("fisher", []), ("svd", []), ("kfac", ["*.1.mlp.*"]), ("kfac", ["*.0.*"])]
)
def test_the_disk_check_counts_at_most_what_is_stored(base, monkeypatch, method, exclude):
    """The up-front check never asks for more disk than the scratch files take: the hidden states
    exactly, and a lower bound on the weightings (refusing a disk that would have sufficed is worse).
    No block below the first with a target stores its inputs: its backward never runs to read them."""
    tmp = base.parent
    estimate, stored, names = [], {"weighting": 0, "hidden": 0}, []
    scratch_bytes, save = block_gradients.scratch_bytes, torch.save

    def recording_estimate(*args):
        estimate.append(scratch_bytes(*args))
        return estimate[-1]

    def recording_save(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        stored[path.name.split("-")[0]] += path.stat().st_size
        names.append(path.name)

    monkeypatch.setattr(block_gradients, "scratch_bytes", recording_estimate)
    monkeypatch.setattr(block_gradients.torch, "save", recording_save)
    config = CompressionConfig(budget=0.5, method=method, allocation="global", calibration_samples=2, exclude=exclude)
    compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    ((hidden, weightings),) = estimate  # (a block whose MLP is excluded has fewer input widths)
    assert hidden <= stored["hidden"] < hidden + 4096 * 30  # the tensors, and each file's few headers
    assert weightings <= stored["weighting"]
    assert (weightings > 0) == (method != "svd")
    blocks_stored = [1] if exclude == ["*.0.*"] else [0, 1]
    assert [n for n in names if n.startswith("hidden")] == [f"hidden-{i}.pt" for i in blocks_stored]


def test_the_backward_holds_one_block(base, monkeypatch):
    """While block i runs backwards, every other parameter (the embeddings and head too) is on meta."""
    tmp = base.parent
    seen = {"blocks": 0}
    materialize, backward = blockwise._materialize, block_gradients._block_backward

    def remember(plan, module, prefix, **kw):
        seen.setdefault("model", module)
        return materialize(plan, module, prefix, **kw)

    def checked(block, *args):
        mine = {id(p) for p in block.parameters()}
        real = [n for n, p in seen["model"].named_parameters() if p.device.type != "meta" and id(p) not in mine]
        assert real == [], real
        seen["blocks"] += 1
        return backward(block, *args)

    monkeypatch.setattr(blockwise, "_materialize", remember)
    monkeypatch.setattr(block_gradients, "_block_backward", checked)
    config = CompressionConfig(budget=0.5, method="kfac", allocation="global", calibration_samples=2)
    compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    assert seen["blocks"] == 2
    assert all(p.device.type == "meta" for p in seen["model"].parameters())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--calibration", "self"], "generating the calibration text needs the whole model"),
        (["--calibration", "TEXT", "--method", "kfac", "--refit"], "cannot stream"),
        (["--calibration", "TEXT", "--method", "whiten", "--heal-steps", "5"], "cannot stream"),
        (["--calibration", "TEXT", "--compress-head"], "drop --compress-head"),  # a model check: still one line
        (["--method", "whiten"], "needs calibration data"),
        (["--heal-steps", "5"], "healing cannot stream"),
    ],
)
def test_what_cannot_stream_is_refused_in_one_line(base, capsys, flags, message):
    tmp = base.parent
    flags = [str(tmp / "text.txt") if f == "TEXT" else f for f in flags]
    capsys.readouterr()
    assert main(["compress", str(base), "-o", str(tmp / "o"), "--stream", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "o").exists()


def test_one_block_in_memory_and_no_kv_cache(base, monkeypatch):
    """While block i runs, every other parameter (the embeddings too) is on meta, and no batch
    carries a KV cache (GPT-2 passes it by position, Llama by keyword)."""
    tmp = base.parent
    seen = {"blocks": 0}
    materialize, run = blockwise._materialize, blockwise._BlockInputs.run

    def remember(plan, module, prefix, **kw):
        seen.setdefault("model", module)  # the first call reads everything outside the blocks
        return materialize(plan, module, prefix, **kw)

    def checked_run(self, block):
        mine = {id(p) for p in block.parameters()}
        real = [n for n, p in seen["model"].named_parameters() if p.device.type != "meta" and id(p) not in mine]
        assert real == [], real
        assert not any(isinstance(v, Cache) for v in [*self.args, *self.kwargs.values()])
        seen["blocks"] += 1
        return run(self, block)

    monkeypatch.setattr(blockwise, "_materialize", remember)
    monkeypatch.setattr(blockwise._BlockInputs, "run", checked_run)
    config = CompressionConfig(budget=0.5, method="whiten", allocation="uniform", calibration_samples=2)
    compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    assert seen["blocks"] == 2 * 2  # 2 blocks x 2 batches
    assert all(p.device.type == "meta" for p in seen["model"].parameters())


def test_a_tied_checkpoint_stored_under_the_head_name_calibrates(base):
    tmp = base.parent
    config = CompressionConfig(budget=0.5, method="whiten", allocation="uniform", calibration_samples=2)
    compress_checkpoint(base, tmp / "a", config, calibration=str(tmp / "text.txt"), progress=False)
    renamed = tmp / "renamed"
    shutil.copytree(base, renamed)
    for f in renamed.glob("*.safetensors"):
        tensors = load_file(f)
        for old, new in (("model.embed_tokens.weight", "lm_head.weight"), ("transformer.wte.weight", "lm_head.weight")):
            if old in tensors:
                tensors[new] = tensors.pop(old)
        save_file(tensors, f, metadata={"format": "pt"})
    index = renamed / "model.safetensors.index.json"
    if index.exists():
        text = index.read_text().replace('"model.embed_tokens.weight"', '"lm_head.weight"')
        index.write_text(text.replace('"transformer.wte.weight"', '"lm_head.weight"'))
    compress_checkpoint(renamed, tmp / "b", config, calibration=str(tmp / "text.txt"), progress=False)
    assert weight_bytes(tmp / "a") == weight_bytes(tmp / "b")


def test_calibration_the_method_does_not_use_streams_plain_svd(base, caplog):
    tmp = base.parent
    plain = CompressionConfig(budget=0.5)
    compress_checkpoint(base, tmp / "a", plain, progress=False)
    svd = CompressionConfig(budget=0.5, method="svd", allocation="uniform")
    compress_checkpoint(base, tmp / "b", svd, calibration=str(tmp / "text.txt"), progress=False)
    assert weight_bytes(tmp / "a") == weight_bytes(tmp / "b")
    assert "not used by method 'svd'" in caplog.text
    with pytest.raises(SvdloraError, match="calibration data is empty"):
        compress_checkpoint(base, tmp / "c", CompressionConfig(budget=0.5), calibration=[], progress=False)
    assert not (tmp / "c").exists()


@pytest.mark.parametrize(
    "given,refusal",
    [
        (["the cat sat on the mat"], "item 0 is a str: tokenize it first"),
        ([torch.tensor([[1, 2, 3]])], "item 0 is a Tensor: tokenize it first"),
        ({"input_ids": torch.tensor([[1, 2, 3]])}, r"calibration is one batch .*: pass a list of batches, \[batch\]"),
    ],
    ids=["text", "tensor", "one-batch"],
)
def test_streamed_calibration_other_than_batches_is_refused_as_in_memory(base, given, refusal):
    """compress_checkpoint(calibration=[text]) crashed in the block passes (AttributeError: 'str' object has no
    attribute 'get') where compress() refuses it: both read the data through plan.read_calibration."""
    tmp = base.parent
    config = CompressionConfig(budget=0.5, method="kfac")
    with pytest.raises(SvdloraError, match=refusal):
        compress(load_pretrained(str(base)), config, calibration=given, progress=False)
    with pytest.raises(SvdloraError, match=refusal):
        compress_checkpoint(base, tmp / "o", config, calibration=given, progress=False)
    assert not (tmp / "o").exists()


@pytest.mark.parametrize(
    "given,refusal",
    [
        (123, "calibration must be a text or sentence file.*got int 123"),
        (({"input_ids": torch.tensor([[1, 2, 3]])},), "calibration must be .*got tuple"),
        ({"input_ids": torch.tensor([[1, 2, 3]])}, "calibration is one batch"),
    ],
    ids=["number", "tuple-of-batches", "one-batch"],
)
def test_streamed_calibration_that_is_no_data_is_refused_for_it_not_for_the_missing_tokenizer(tmp_path, given, refusal):
    """A checkpoint without tokenizer files, given calibration that is no data, was told to save a tokenizer (the
    streamed run loaded it before reading the data), where compress() names the value."""
    tiny_llama().save_pretrained(tmp_path / "base")  # no tokenizer files
    config = CompressionConfig(budget=0.5, method="kfac")
    with pytest.raises(SvdloraError, match=refusal):
        compress_checkpoint(tmp_path / "base", tmp_path / "o", config, calibration=given, progress=False)
    assert not (tmp_path / "o").exists()


def test_targets_outside_the_block_stack_are_refused(base):
    model = tiny_llama()
    assert find_blocks(model, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"])[0] == "model.layers"
    with pytest.raises(SvdloraError, match="'lm_head' is outside it"):
        find_blocks(model, ["model.layers.0.mlp.up_proj", "lm_head"])
    tmp = base.parent
    config = CompressionConfig(budget=0.5, method="whiten", allocation="uniform", keep_head=False)
    with pytest.raises(SvdloraError, match="outside it"):
        compress_checkpoint(base, tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    mixed = tiny_llama()
    mixed.config.layer_types = ["full_attention", "sliding_attention"]  # Gemma / Qwen-style mixed blocks
    mixed.save_pretrained(tmp / "mixed")
    with pytest.raises(SvdloraError, match="differ in attention type"):
        compress_checkpoint(tmp / "mixed", tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    tiny_t5().save_pretrained(tmp / "t5")
    config = CompressionConfig(budget=0.5, method="whiten", allocation="uniform")
    with pytest.raises(SvdloraError, match="this is a seq2seq model"):
        compress_checkpoint(tmp / "t5", tmp / "o", config, calibration=str(tmp / "text.txt"), progress=False)
    assert not (tmp / "o").exists()


def tiny_benchmark_inputs(tmp_path) -> list[str]:
    """A tiny Llama with a tokenizer and WikiText-like files: the benchmarks' arguments."""
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.max_position_embeddings = 512  # the benchmarks' fixed 512-token test windows
    model.save_pretrained(tmp_path / "base")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    data = tmp_path / "wiki"
    data.mkdir()
    for split in ("valid", "test"):
        (data / f"wikitext-2.{split}.txt").write_text(word_text(WORDS, 1200))
    return ["--dense", str(tmp_path / "base"), "--wikitext", str(data), "--limit", "2"]


def test_statistics_speed_benchmark_runs_on_a_tiny_model(tmp_path):
    from benchmarks import statistics_speed

    args = tiny_benchmark_inputs(tmp_path)
    text = str(tmp_path / "wiki" / "wikitext-2.valid.txt")
    assert statistics_speed.main(["--model", args[1], "--text", text, "--windows", "2", "--profile"]) > 0


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    from benchmarks import streamed_calibration

    argv = [*tiny_benchmark_inputs(tmp_path), "--work", str(tmp_path / "work")]
    streamed_calibration.main([*argv, "--with-default", "--json", str(tmp_path / "res" / "streamed.json")])
    result = json.loads((tmp_path / "res" / "streamed.json").read_text())
    assert result["identical_streamed_in_memory"] is True
    assert result["identical_streamed_in_memory_default"] is True
    rows = result["rows"]
    assert set(rows) == {
        "plain SVD, streamed",
        "whitened, streamed block by block",
        "whitened, in memory",
        "default (kfac + global), streamed block by block",
        "in-memory default (kfac + global)",
    }
    whitened = rows["whitened, streamed block by block"]["perplexity"]
    assert whitened == rows["whitened, in memory"]["perplexity"]
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows.values())


def test_gradient_free_allocation_benchmark_runs_on_a_tiny_model(tmp_path):
    from benchmarks import gradient_free_allocation

    argv = [*tiny_benchmark_inputs(tmp_path), "--samples", "4"]
    gradient_free_allocation.main([*argv, "--json", str(tmp_path / "res" / "allocation.json")])
    rows = json.loads((tmp_path / "res" / "allocation.json").read_text())["rows"]
    assert set(rows) == {"uniform", "whitened spectra", "relative spectra"}
    assert all(r["perplexity"] > 1 for r in rows.values())
    assert rows["uniform"]["params_after"] != rows["relative spectra"]["params_after"]  # another allocation ran


@pytest.mark.parametrize("by_row", [False, True], ids=["whole", "by-row"])
@pytest.mark.parametrize(("method", "allocation"), [("whiten", "uniform"), ("kfac", "global")])
def test_padded_batches_stream_as_in_memory(base, method, allocation, by_row, monkeypatch):
    """Batches passed from Python with padding: in memory their padding is no tokens (a batch in one
    pass, or row by row where a layer's padding cannot be told in one pass: ``Unbatchable``, forced
    here), and so it is block by block: the same bytes."""
    if by_row:
        from svdlora import calibration

        def unbatchable(x, masks):
            if masks:
                raise calibration.Unbatchable
            return None

        monkeypatch.setattr(calibration, "mask_for", unbatchable)
    tmp = base.parent
    tok = word_tokenizer(WORDS)
    ids = tok([word_text(WORDS, 20), word_text(WORDS, 9)], return_tensors="pt", padding=True)
    batches = [{**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}]
    assert not ids["attention_mask"].all()
    config = CompressionConfig(budget=0.5, method=method, allocation=allocation)
    model = load_pretrained(str(base))
    compress(model, config, calibration=batches, progress=False)
    save_compressed(model, tmp / "memory", source=base)
    compress_checkpoint(base, tmp / "stream", config, calibration=batches, progress=False)
    assert weight_bytes(tmp / "memory") == weight_bytes(tmp / "stream")


def test_an_unbatchable_layer_restarts_the_backward_passes_before_the_head(base, monkeypatch):
    """With gradients, a layer input whose padding no mask tells (``Unbatchable``, forced here) was found
    only by the backward pass: every block was read forwards, the embeddings and head again, and the last
    block backwards before the run started again row by row. The forward pass now finds it, at the first
    such block; the bytes stay in-memory's."""
    from svdlora import calibration

    def unbatchable(x, masks):
        if masks:
            raise calibration.Unbatchable
        return None

    monkeypatch.setattr(calibration, "mask_for", unbatchable)
    monkeypatch.setattr(block_gradients, "mask_for", unbatchable, raising=False)  # the forward pass's check
    reads, materialize = [], blockwise._materialize

    def counted(plan, module, prefix, **kw):
        reads.append(prefix.rstrip(".").rpartition(".")[2])  # a block's index, or "" outside the blocks
        return materialize(plan, module, prefix, **kw)

    monkeypatch.setattr(blockwise, "_materialize", counted)
    tmp = base.parent
    tok = word_tokenizer(WORDS)
    ids = tok([word_text(WORDS, 20), word_text(WORDS, 9)], return_tensors="pt", padding=True)
    batches = [{**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}]
    config = CompressionConfig(budget=0.5, method="kfac", allocation="global")
    model = load_pretrained(str(base))
    compress(model, config, calibration=batches, progress=False)
    save_compressed(model, tmp / "memory", source=base)
    compress_checkpoint(base, tmp / "stream", config, calibration=batches, progress=False)
    assert weight_bytes(tmp / "memory") == weight_bytes(tmp / "stream")
    first_try = ["", "0"]  # was ["", "0", "1", "", "1"]: forwards, the head, the last block backwards
    assert reads == [*first_try, "", "0", "1", "", "1", "0"]


@pytest.mark.parametrize("method", ["whiten", "fisher"])
def test_a_float64_checkpoint_streams_as_in_memory(tmp_path, method):
    """A float64 model is whitened with a float64 S in memory (``plan.factor_dtype``): the block passes too."""
    torch.manual_seed(0)
    tiny_llama().double().save_pretrained(tmp_path / "base")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
    config = CompressionConfig(
        budget=0.5, method=method, allocation="uniform", calibration_samples=3, calibration_length=16
    )
    same_in_memory_and_streamed(tmp_path / "base", config)


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_layers_the_loss_does_not_reach_stream_as_in_memory(tmp_path, method, caplog):
    """Layers without gradient statistics get their uniform share of a global allocation (``allocate_comparable``),
    streamed as in memory: the block passes say which spectra are loss-weighted as the whole model's do."""
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1's q/k/v no longer reach the loss
    model.save_pretrained(tmp_path / "base")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
    config = CompressionConfig(
        budget=0.5, method=method, allocation="global", exclude=["model.layers.1.self_attn.o_proj"],
        calibration_samples=3, calibration_length=16,
    )  # fmt: skip
    _, report = same_in_memory_and_streamed(tmp_path / "base", config)
    assert caplog.text.count("3 layers without usable gradient statistics (the loss does not reach them") == 2
    apart = [m for m in report["modules"] if m["name"].startswith("model.layers.1.self_attn.")]
    assert [m.get("est_loss") for m in apart if m.get("ranks")] == [None, None, None]


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_a_layer_the_loss_never_reaches_is_said_streamed_as_in_memory(tmp_path, monkeypatch, method, caplog):
    """Under uniform allocation the whole model's statistics name once the layers the loss never reaches (no
    output gradients: a detached output here); the block passes said nothing of them."""
    cut = "model.layers.1.self_attn.o_proj"  # its output detached: q/k/v, read by it alone, are cut off too

    def detached(model):
        model.get_submodule(cut).register_forward_hook(lambda module, args, output: output.detach())
        return model

    meta_model = blockwise.meta_model
    monkeypatch.setattr(blockwise, "meta_model", lambda *args, **kwargs: detached(meta_model(*args, **kwargs)))
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    text = tmp_path / "text.txt"
    text.write_text(word_text(WORDS, 600))
    config = CompressionConfig(budget=0.5, method=method, allocation="uniform", calibration_samples=2)
    model = detached(load_pretrained(str(tmp_path / "base")))
    compress(model, config, calibration=str(text), processor=word_tokenizer(WORDS), progress=False)
    said = [r.getMessage() for r in caplog.records if "never reaches" in r.getMessage()]
    attention = ", ".join(f"model.layers.1.self_attn.{n}_proj" for n in "qkvo")
    assert said == [f"the loss never reaches layers {attention} (no output gradients): " + said[0].split(": ", 1)[1]]
    caplog.clear()
    compress_checkpoint(tmp_path / "base", tmp_path / "stream", config, calibration=str(text), progress=False)
    assert [r.getMessage() for r in caplog.records if "never reaches" in r.getMessage()] == said
