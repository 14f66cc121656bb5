"""The shard writer: standard safetensors files, whatever the order of writes."""

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from svdlora import SvdloraError
from svdlora.io import writer as writer_module
from svdlora.io.writer import INDEX_NAME, ShardedWriter, TensorSpec, parse_size, weight_files


def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.half": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.empty": torch.zeros(0, 4),
        "g.bytes": torch.arange(9, dtype=torch.uint8),
        "h.big": torch.randn(40, 10, generator=g),  # larger than a shard on its own
    }


@pytest.mark.parametrize("max_shard_size", [10**9, 600])
def test_any_write_order_gives_readable_identical_files(tmp_path, max_shard_size):
    tensors = mixed_tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    outputs = []
    for seed, folder in enumerate([tmp_path / "one", tmp_path / "two"]):
        folder.mkdir()
        writer = ShardedWriter(folder, specs, {"format": "pt", "note": "x"}, max_shard_size)
        writer.create_files()
        names = list(tensors)
        random.Random(seed).shuffle(names)
        for name in names:
            writer.write(name, tensors[name])
        writer.close()
        writer.write_index()
        outputs.append({p.name: p.read_bytes() for p in folder.iterdir()})
        read = {}
        for file in writer.files:
            read |= load_file(str(folder / file))
            with safe_open(str(folder / file), framework="pt") as f:
                assert f.metadata() == {"format": "pt", "note": "x"}
        assert read.keys() == tensors.keys()
        assert all(torch.equal(read[k], v) for k, v in tensors.items())
        if len(writer.files) > 1:
            index = json.loads((folder / INDEX_NAME).read_text())
            assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == writer.total_size
    assert outputs[0] == outputs[1]


def test_write_checks_the_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("w", (2, 2), torch.float32)], {}, "1GB")
    writer.create_files()
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("w", torch.zeros(2, 3))
    writer.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(100) == 100
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("5KiB") == 5 * 1024 and parse_size("5B") == parse_size("5") == 5
    for bad in ("big", "5IB", "5I", "5iB", True):  # a binary 'i' with no unit was read as 5 bytes; True as 1
        with pytest.raises(SvdloraError, match="max shard size"):
            parse_size(bad)
    for empty in ("0", "0GB", "0.0001KB", 0, -3):  # 0 bytes would put every tensor in its own shard
        with pytest.raises(SvdloraError, match="above 0 bytes"):
            parse_size(empty)


@pytest.mark.parametrize(
    "weight_map",
    [
        {"a": 1},
        ["model-00001-of-00002.safetensors"],
        {},
        {"a": "../other/model.safetensors"},
        {"a": "/abs.safetensors"},
    ],
)
def test_a_broken_index_is_refused_in_one_line(tmp_path, weight_map):
    """Numbers or a list gave a raw TypeError/AttributeError; an empty map an IndexError in load_compressed;
    a path out of the folder read another folder's shard."""
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(SvdloraError, match="is corrupted"):
        weight_files(tmp_path)


def test_a_writer_keeps_a_bounded_number_of_shard_files_open(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_OPEN_FILES", 2)  # thousands of shards against ulimit -n, in small
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(6)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, {"format": "pt"}, 16)  # one tensor per shard
    writer.create_files()
    for name in [*tensors, *reversed(tensors), "t0"]:
        writer.write(name, tensors[name])
        assert len(writer._handles) <= 2
    writer.close()
    writer.write_index()
    loaded = {k: v for f in weight_files(tmp_path) for k, v in load_file(str(f)).items()}
    assert len(weight_files(tmp_path)) == 6 and all(torch.equal(loaded[k], v) for k, v in tensors.items())
