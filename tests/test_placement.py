"""load_compressed with a device_map (accelerate) and the per-layer merged rebuild."""

import re

import pytest
import torch

from svdlora import SvdloraError, compress, load_compressed, save_compressed
from svdlora.layers import LowRankLinear

from .conftest import output_of, tiny_gpt2, tiny_llama


@pytest.fixture(params=["llama", "gpt2"])
def folder(request, tmp_path):
    torch.manual_seed(0)
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]()
    compress(model, budget=0.5, submatrices=2, progress=False)
    save_compressed(model, tmp_path / "out", max_shard_size="20KB")
    return request.param, tmp_path / "out"


# "auto" fills a GPU first where there is one: these tests are about the CPU
CPU_ONLY = {"cpu": "1GB"} if torch.cuda.is_available() else None


@pytest.mark.parametrize("merge", [False, True])
def test_device_map_on_cpu_gives_the_same_logits(folder, merge):
    kind, path = folder
    want = output_of(load_compressed(path, device="cpu", merge=merge), kind)
    layers = "model.layers" if kind == "llama" else "transformer.h"
    split = {"": "cpu", f"{layers}.0": "cpu", f"{layers}.1": "cpu"}
    maps = [("auto", CPU_ONLY), ("sequential", {"cpu": "1GB"}), (split, None)]
    maps += [("cpu", None), (torch.device("cpu"), None)]
    for device_map, max_memory in maps:  # one device as transformers takes it: "cpu" was refused
        model = load_compressed(path, device_map=device_map, max_memory=max_memory, merge=merge)
        assert torch.equal(output_of(model, kind), want), device_map
        lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        assert bool(lowrank) != merge
        if not isinstance(device_map, dict) and device_map not in ("auto", "sequential"):
            assert model.hf_device_map == {"": "cpu"}


def test_merged_equals_factorized_product(folder):
    kind, path = folder
    factorized = load_compressed(path, device="cpu")
    merged = load_compressed(path, device="cpu", merge=True)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(output_of(merged, kind), output_of(factorized, kind), rtol=1e-4, atol=1e-5)


def test_bad_device_map(folder):
    _, path = folder
    with pytest.raises(SvdloraError, match="device_map must be"):
        load_compressed(path, device_map="everywhere")
    with pytest.raises(SvdloraError, match="places no module"):
        load_compressed(path, device_map={"lm_head": "cpu"})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"device": "cuda"}, "CUDA is not available"),  # was a raw pinned-memory RuntimeError
        ({"device_map": {"": 0}}, "CUDA is not available"),  # was an AssertionError from torch
        ({"device_map": "auto", "max_memory": {0: "1GB"}}, "CUDA is not available"),  # accelerate's assertion
        ({"device": "meta"}, "holds no values"),  # was "cannot be read: re-run svdlora compress"
    ],
)
def test_a_device_this_machine_lacks_is_one_error(folder, monkeypatch, options, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SvdloraError, match=match):
        load_compressed(folder[1], **options)


@pytest.mark.parametrize(
    "max_memory, match",
    [
        ({"cpu": "lots"}, "max_memory['cpu'] must look like 5GB"),  # was accelerate's ValueError
        ({"cpu": "5T"}, None),  # read by svdlora (accelerate's ValueError before)
        ({"cpu": -5}, "above 0 bytes"),  # was 'device_map puts layers on disk'
        ({"cpu": "0GB"}, "above 0 bytes"),
        ({"cuda:0": "1GB"}, "max_memory keys must be GPU indices or 'cpu'"),  # accelerate's ValueError on a GPU
        (["cpu"], "max_memory must be a dict"),  # was a TypeError
    ],
)
def test_a_bad_max_memory_is_refused_before_the_load(folder, max_memory, match):
    given = {**max_memory} if isinstance(max_memory, dict) else max_memory
    if match is None:
        load_compressed(folder[1], device_map="auto", max_memory=max_memory)
    else:
        with pytest.raises(SvdloraError, match=re.escape(match)):
            load_compressed(folder[1], device_map="auto", max_memory=max_memory)
    assert max_memory == given  # accelerate rewrote the caller's sizes in place (as bytes)


@pytest.mark.parametrize("device_map", [None, "cpu", {"": "cpu"}])
def test_max_memory_without_a_device_map_strategy_is_refused(folder, device_map):
    """It was ignored without a word: the model loaded whole onto one device, whatever the caps."""
    with pytest.raises(SvdloraError, match="max_memory caps what a device_map strategy"):
        load_compressed(folder[1], device_map=device_map, max_memory={"cpu": "1GB"})


def test_a_tied_head_is_planned_tied_and_the_map_is_kept(folder, caplog):
    kind, path = folder
    for device_map in ("auto", {"": "cpu"}):
        with caplog.at_level("WARNING"):
            model = load_compressed(path, device_map=device_map, max_memory=CPU_ONLY if device_map == "auto" else None)
        assert "not tied" not in caplog.text  # accelerate warns when it plans an untied skeleton
        assert isinstance(model.hf_device_map, dict) and set(model.hf_device_map.values()) == {"cpu"}
        if kind == "gpt2":  # GPT-2 ties its head to the token embedding
            assert model.lm_head.weight is model.transformer.wte.weight


def test_a_device_map_naming_a_module_the_model_lacks_is_refused(folder):
    """A typo in a device_map dict: its layers went, without a word, to the device of '' (here the CPU; on a
    machine with GPUs, not the one the user named)."""
    kind, path = folder
    layers = "model.layers" if kind == "llama" else "transformer.h"
    with pytest.raises(SvdloraError, match=r"device_map names 'model\.layer\.1', which the model does not have"):
        load_compressed(path, device_map={"": "cpu", "model.layer.1": "cpu"})
    named = {"": "cpu", f"{layers}.1": "cpu", f"{layers}.1.mlp": "cpu"}  # modules and a tensor, under their names
    tensor = next(name for name, _ in load_compressed(path, device="cpu").named_parameters() if name.endswith(".B"))
    load_compressed(path, device_map=named | {tensor: "cpu"})
    dense_name = tensor.rpartition(".")[0] + ".weight"  # the dense model's name of a factorized layer's weight
    with pytest.raises(SvdloraError, match=re.escape(f"name the layer instead ({dense_name[:-7]!r}: its tensors here")):
        load_compressed(path, device_map={"": "cpu", dense_name: "cpu"})


def test_device_and_device_map_together_are_refused(folder):
    """device_map places every tensor: a device passed with it went unused without a word (device='cuda:1' with
    device_map='auto': the map alone decided)."""
    _, path = folder
    for device_map in ("auto", "cpu", {"": "cpu"}):
        with pytest.raises(SvdloraError, match="device='cpu' and device_map both say where the weights go"):
            load_compressed(path, device="cpu", device_map=device_map)
