"""Memory before loading: the limits a process runs under, the size of a checkpoint, and what the
CLI does with a model that would not fit (streams it where that writes the same files, else says so)."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from svdlora import memory
from svdlora.cli import main
from svdlora.errors import StreamingRefusal, SvdloraError

from .conftest import tiny_marian, tiny_t5, tiny_vit
from .eval_helpers import lm_folder
from .test_streaming import tied_llama, weight_bytes


def _cgroup(tmp_path: Path, monkeypatch, version: int, levels: dict[str, tuple[str, int, int]]) -> None:
    """A fake cgroup mount: folder -> (limit, usage, reclaimable cache), the process in the deepest."""
    base = tmp_path / ("cgroup" if version == 2 else "memory")
    limit, usage, cache = (
        ("memory.max", "memory.current", "inactive_file")
        if version == 2
        else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    )
    for relative, (lim, use, reclaimable) in levels.items():
        folder = base / relative
        folder.mkdir(parents=True, exist_ok=True)
        (folder / limit).write_text(f"{lim}\n")
        (folder / usage).write_text(f"{use}\n")
        (folder / "memory.stat").write_text(f"anon 5\n{cache} {reclaimable}\n")
    deepest = max(levels, key=len)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::/{deepest}\n" if version == 2 else f"5:cpu:/\n4:memory:/{deepest}\n")
    monkeypatch.setattr(memory, "CGROUPS", [(base, limit, usage, cache)])
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)


@pytest.mark.parametrize("version", [1, 2])
def test_the_tightest_cgroup_level_counts_and_page_cache_is_not_used_memory(tmp_path, monkeypatch, version):
    unlimited = "max" if version == 2 else str(2**63 - 4096)
    levels = {"": (unlimited, 9000, 0), "a": ("5000", 3000, 1000), "a/b": ("8000", 1000, 0)}
    _cgroup(tmp_path, monkeypatch, version, levels)
    assert memory._cgroup_room() == 5000 - (3000 - 1000)  # the parent's limit binds; its cache is reclaimable
    assert memory.limits()["the memory cgroup"] == 3000


def test_no_cgroup_limit_and_the_address_space_limit(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, 2, {"": ("max", 10, 0)})
    assert memory._cgroup_room() is None
    vms = psutil.Process().memory_info().vms
    monkeypatch.setattr(resource, "getrlimit", lambda _: (vms + 10**9, resource.RLIM_INFINITY))  # ulimit -v
    assert abs(memory._address_space_room() - 10**9) < 64 << 20  # the process may grow a little meanwhile
    rooms = memory.limits()
    assert "the memory cgroup" not in rooms and abs(rooms["ulimit -v"] - 10**9) < 64 << 20


def test_the_first_limit_an_in_memory_compress_would_pass(monkeypatch):
    rooms = {"available memory": 800_000}
    monkeypatch.setattr(memory, "limits", lambda with_swap=False: rooms)
    assert memory.shortfall(500_000, 0.5) is None  # the model and its factors: 750 kB
    assert memory.shortfall(600_000, 0.5) == ("available memory", 900_000, 800_000)
    assert memory.shortfall(500_000, None) == ("available memory", 1_000_000, 800_000)  # a fixed rank: up to 2x
    assert memory.shortfall(600_000, 0.5, factors=False) is None
    rooms["ulimit -v"] = 10**9  # the mapped file and the libraries count there too
    assert memory.shortfall(500_000, 0.5) is None
    assert memory.shortfall(500_000 << 10, 0.5) == ("available memory", 750_000 << 10, 800_000)
    rooms["available memory"] = 10**12
    assert memory.shortfall(500_000 << 10, 0.5) == ("ulimit -v", (1_250_000 << 10) + memory.LIBRARIES, 10**9)


def test_checkpoint_bytes_from_the_headers(tmp_path):
    model = tied_llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")  # sharded: read through the index
    stored = 0
    for file in (tmp_path / "m").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            stored += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert memory.checkpoint_bytes(tmp_path / "m") == stored
    assert memory.checkpoint_bytes(tmp_path / "m", "bfloat16") == stored // 2
    assert memory.checkpoint_bytes("org/a-hub-model") is None  # its size is known only after the download
    (tmp_path / "bin").mkdir()
    torch.save({}, tmp_path / "bin" / "pytorch_model.bin")
    assert memory.checkpoint_bytes(tmp_path / "bin") is None


def _room(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(memory, "limits", lambda with_swap=False: {"available memory": nbytes})


def test_a_model_too_large_for_memory_is_streamed_to_the_same_files(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    args = ["compress", str(base), "--budget", "0.5", "--no-progress", "--calibration", "none"]
    assert main([*args, "-o", str(tmp_path / "in-memory")]) == 0
    assert "streaming" not in capsys.readouterr().err
    _room(monkeypatch, memory.checkpoint_bytes(base) * 5 // 4)  # the model fits, not with its factors
    assert main([*args, "-o", str(tmp_path / "streamed")]) == 0
    err = capsys.readouterr().err
    assert "streaming it instead" in err and "(streamed" in err
    assert weight_bytes(tmp_path / "streamed") == weight_bytes(tmp_path / "in-memory")


def test_a_run_streamed_for_memory_points_to_memory_by_no_stream(tmp_path, monkeypatch, capsys):
    """Found by review: a run streamed because the model would not fit, without --stream, said of a streamed
    refusal 'drop --stream' (before cfbd933: 'run one process, without torchrun'), a flag not given."""
    import svdlora.cli.compress_run as compress_run

    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    _room(monkeypatch, memory.checkpoint_bytes(base) * 5 // 4)  # the model fits, not with its factors: streamed

    def refuse(*args, **kwargs):
        raise StreamingRefusal("'x' never ran on the calibration data: --exclude it, or {in_memory}")

    monkeypatch.setattr(compress_run, "compress_checkpoint", refuse)
    argv = ["compress", str(base), "--budget", "0.5", "--calibration", "none", "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "streaming it instead" in err and "--exclude it, or pass --no-stream to load it in memory" in err, err


def test_a_run_that_cannot_stream_is_refused_or_warned(tmp_path, monkeypatch, capsys):
    """Found by review: the warning quoted the streamed refusal's 'drop --stream', a flag not given (the run is
    in memory already)."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    model = memory.checkpoint_bytes(base)
    capsys.readouterr()
    argv = ["compress", str(base), "--budget", "0.5", "--no-progress", "-o", str(tmp_path / "o")]
    _room(monkeypatch, model // 2)  # not even the model fits
    assert main(argv) == 2  # --calibration auto: self-generated text needs the whole model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration auto" in err[0] and "--stream" in err[0], err
    assert main([*argv, "--calibration", "none", "--heal-steps", "2"]) == 2
    assert "healing needs calibration data" in capsys.readouterr().err  # in memory or streamed
    assert main([*argv, "--calibration", "auto", "--stream", "--heal-steps", "2"]) == 2
    assert "healing cannot stream" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    _room(monkeypatch, model + 1)  # the model fits, its factors may not: warned, then run in memory
    assert main([*argv, "--calibration", "none", "--stage-dtypes", "float32"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "--stage-dtypes cannot stream" in err and "(streamed" not in err
    assert "built in memory): compress in memory, or drop --stage-dtypes" in err and "--stream" not in err, err
    assert (tmp_path / "o" / "svdlora_config.json").is_file()


def test_stage_dtype_factors_are_sized_as_held_in_memory(tmp_path, monkeypatch, capsys):
    """The check sized the factors as budget x the model, their bytes on disk, but a stage-dtype layer holds them
    dequantized: a full-int4 + int8 run at budget 0.2 holds 1.2x the targeted matrices (tiny Llama), not 0.2x,
    and with room for 1.5x the model it ran without the warning that it may run out of memory."""
    base = tmp_path / "base"
    tied_llama().save_pretrained(base)
    _room(monkeypatch, memory.checkpoint_bytes(base) * 3 // 2)
    argv = ["compress", str(base), "--budget", "0.2", "--submatrices", "2", "--calibration", "none", "--no-progress"]
    assert main([*argv, "--stage-dtypes", "full-int4,int8", "-o", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "it may run out of memory" in err and "--stage-dtypes cannot stream" in err, err
    assert main([*argv, "-o", str(tmp_path / "plain")]) == 0  # float factors: 0.2x, as before
    assert "warning" not in capsys.readouterr().err


def test_a_streamed_run_evaluates_its_folder_for_the_card(tmp_path, capsys):
    model, text = lm_folder(tmp_path)
    out = tmp_path / "svd"
    argv = ["compress", str(model), "--budget", "0.5", "--stream", "--eval", str(text), "--eval-limit", "2"]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "perplexity" in card
    assert "perplexity" in capsys.readouterr().out  # printed too, not only in the card


def test_what_streams_by_itself_and_what_decides_it(tmp_path, monkeypatch, capsys):
    llama, t5, vit, marian = tmp_path / "llama", tmp_path / "t5", tmp_path / "vit", tmp_path / "marian"
    tied_llama().save_pretrained(llama)
    tiny_t5().save_pretrained(t5)
    tiny_vit().save_pretrained(vit)
    tiny_marian().save_pretrained(marian)
    capsys.readouterr()

    def compress(folder: Path, room: float, *flags: str) -> str:
        _room(monkeypatch, int(memory.checkpoint_bytes(folder) * room))
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        assert main(["compress", str(folder), "-o", str(out), "--no-progress", *flags]) == 0
        return capsys.readouterr().err

    # a fixed rank may keep factors as large as the model: 2x, where budget 0.5 needs 1.5x
    assert "streaming it instead" not in compress(llama, 1.75, "--budget", "0.5", "--calibration", "none")
    assert "streaming it instead" in compress(llama, 1.75, "--rank", "4", "--calibration", "none")
    assert "streaming it instead" not in compress(llama, 1.2, "--calibration", "none", "--no-stream")
    # --calibration auto is plain SVD for a model that is not a causal LM: it streams as it is
    assert "streaming it instead" in compress(t5, 1.2, "--budget", "0.5")
    # a checkpoint transformers renames at load streams under the model's names
    assert "streaming it instead" in compress(vit, 1.2, "--budget", "0.5", "--calibration", "none")
    # a model the streamed path cannot read (Marian's positions are built, not stored) is warned about and
    # compressed in memory, not refused
    err = compress(marian, 1.2, "--budget", "0.5", "--calibration", "none")
    assert "warning" in err and "it cannot stream" in err and "streaming it instead" not in err


def test_statistics_bytes_count_a_shared_input_once_and_kfac_output_grams():
    from torch import nn

    from svdlora.targets import Target

    def target(name, out, inp):
        return Target(name, nn.Identity(), "linear", out, inp)

    attention = [target(f"l0.attn.{n}", 16, 32) for n in ("q", "k", "v")]  # one input, one Gram
    down = target("l0.mlp.down", 32, 64)
    assert memory.statistics_bytes([*attention, down], "whiten") == 8 * 32 * 32 + 8 * 64 * 64
    assert memory.statistics_bytes([*attention, down], "kfac") == 8 * (32 * 32 + 64 * 64 + 3 * 16 * 16 + 32 * 32)


def test_calibration_statistics_count_in_the_need(tmp_path, monkeypatch, capsys):
    from svdlora.config import CompressionConfig
    from svdlora.plan import auto_method
    from svdlora.streaming import plan

    model, text = lm_folder(tmp_path)
    size = memory.checkpoint_bytes(model)
    targets = plan(model, CompressionConfig(budget=0.5)).targets
    statistics = memory.statistics_bytes(targets, auto_method(targets))  # the default method: auto (kfac here)
    assert statistics > 0
    capsys.readouterr()
    calibrated = ["--budget", "0.5", "--calibration", str(text), "--calibration-samples", "2"]
    calibrated += ["--calibration-length", "16", "--no-progress"]
    _room(monkeypatch, int(size * 1.5) + statistics + 4096)  # the model, its factors and the statistics fit
    assert main(["compress", str(model), *calibrated, "-o", str(tmp_path / "a")]) == 0
    assert "streaming it instead" not in capsys.readouterr().err
    _room(monkeypatch, int(size * 1.5) + statistics // 2)  # only the model and its factors fit
    assert main(["compress", str(model), *calibrated, "-o", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "calibration statistics" in err and "streaming it instead" in err
    assert main(["compress", str(model), *calibrated[:2], "--calibration", "none", "-o", str(tmp_path / "c")]) == 0
    assert "streaming it instead" not in capsys.readouterr().err  # plain SVD: no statistics


def test_healing_counts_its_optimizer_state_and_masters_in_the_need(tmp_path, monkeypatch):
    from svdlora.cli import memory_choice
    from svdlora.config import CompressionConfig
    from svdlora.layers import LowRankLinear
    from svdlora.streaming import plan

    model, text = lm_folder(tmp_path)
    needs: list[int] = []

    def shortfall(model_bytes, budget, extra=0, **_):  # records the estimate, then stops the run
        needs.append(extra)
        raise SvdloraError("estimated")

    monkeypatch.setattr(memory_choice.memory, "shortfall", shortfall)
    argv = ["compress", str(model), "--budget", "0.5", "--calibration", str(text), "-o", str(tmp_path / "o")]
    for dtype in ("float32", "float16"):
        for heal in ([], ["--heal-steps", "2", "--heal-loss", "lm"]):  # lm: no teacher copy of the model
            assert main([*argv, "--dtype", dtype, *heal]) == 2
    factors = []  # per dtype: the CLI stores pivoted factors, whose int64 indices the budget prices per dtype
    for dtype in ("float32", "float16"):
        planned = plan(model, CompressionConfig(budget=0.5, pivot=True), dtype=dtype)
        modules = [m for m in planned.model.modules() if isinstance(m, LowRankLinear)]
        factors.append(sum(p.numel() for m in modules for p in m.factor_parameters()))
    # Adam's two float32 moments and the float32 gradient; in float16 the float32 masters too (8x 2 bytes)
    assert [needs[1] - needs[0], needs[3] - needs[2]] == [12 * factors[0], 16 * factors[1]]


def _fake_hub(tmp_path: Path, monkeypatch, remote: Path) -> list[list[str]]:
    """The hub, reachable, holding ``remote`` at one commit as 'org/tiny': downloads (``snapshot_download``, as
    ``hub`` calls it) copy the files their patterns name into that commit's snapshot in a Hugging Face cache under
    ``tmp_path``, which transformers reads offline; each download is recorded (its patterns), the cache's answers
    are not. Headers are read from the remote files."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.utils import filter_repo_objects

    from svdlora import hub

    asked: list[list[str]] = []
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        assert repo_id == "org/tiny" and revision in (None, snapshot.name)
        if local_files_only:  # the cached snapshot, whichever files it holds
            if not snapshot.is_dir():
                raise FileNotFoundError("the model is not in the local cache")
            return str(snapshot)
        asked.append(list(allow_patterns))
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(snapshot.name)
        for name in filter_repo_objects([f.name for f in remote.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    def metadata(repo_id, revision=None):
        assert revision == snapshot.name  # the side files' commit
        counts: dict[str, int] = {}
        for file in remote.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[tensor.dtype]
                    counts[name] = counts.get(name, 0) + tensor.numel()
        return type("Metadata", (), {"parameter_count": counts})()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers' own reads: from that cache
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    return asked


def test_a_hub_id_not_in_the_cache_is_sized_before_its_weights_are_downloaded(tmp_path, monkeypatch, capsys):
    from svdlora import hub
    from svdlora.cli import compress_run

    remote = tmp_path / "remote"
    tied_llama().save_pretrained(remote, max_shard_size="20KB")
    model = memory.checkpoint_bytes(remote)
    asked = _fake_hub(tmp_path, monkeypatch, remote)
    side, counts = hub.remote_parameters("org/tiny")
    assert asked == [hub.SIDE_FILES] and not list(side.glob("*.safetensors"))  # the side files only
    assert memory.loaded_bytes(counts, None) == model and memory.loaded_bytes({"F7": 1}, None) is None
    flags = ["--budget", "0.5", "--no-progress"]
    shutil.rmtree(side)  # not in the cache again

    # the default recipe cannot stream a causal LM and the model alone does not fit: refused before the download
    _room(monkeypatch, model // 2)
    asked.clear()
    capsys.readouterr()  # save_pretrained's progress bar, where no earlier test turned transformers' bars off
    assert main(["compress", "org/tiny", *flags, "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration auto" in err[0] and "model alone" in err[0], err
    assert asked == [hub.SIDE_FILES] and not (tmp_path / "refused").exists()
    shutil.rmtree(side)

    # it does not fit and can stream: downloaded (the files a load would fetch), then streamed
    _room(monkeypatch, model * 5 // 4)
    asked.clear()
    assert main(["compress", "org/tiny", *flags, "--calibration", "none", "-o", str(tmp_path / "streamed")]) == 0
    assert "streaming it instead" in capsys.readouterr().err
    assert asked[0] == hub.SIDE_FILES and sorted(f.name for f in remote.glob("*.safetensors")) in asked
    assert (
        main(["compress", str(remote), *flags, "--calibration", "none", "--stream", "-o", str(tmp_path / "local")]) == 0
    )
    assert weight_bytes(tmp_path / "streamed") == weight_bytes(tmp_path / "local")
    shutil.rmtree(side)

    # it fits: downloaded all the same (the load reads these files), then compressed in memory
    _room(monkeypatch, model * 10)
    monkeypatch.setattr(compress_run, "load_pretrained", lambda name, **k: AutoModelForCausalLM.from_pretrained(side))
    assert main(["compress", "org/tiny", *flags, "--calibration", "none", "-o", str(tmp_path / "fits")]) == 0
    assert "streaming it instead" not in capsys.readouterr().err
    assert weight_bytes(tmp_path / "fits") == weight_bytes(tmp_path / "local")


def test_the_hub_is_asked_through_the_environment_s_proxy(monkeypatch):
    import socket

    from svdlora import models

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    connects = models._connects
    monkeypatch.setattr(models, "_connects", lambda address, timeout: asked.append(address) or True)
    assert models.hub_reachable() and asked[-1] == ("huggingface.co", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert models.hub_reachable() and asked[-1] == ("proxy.corp", 3128)
    monkeypatch.setenv("ALL_PROXY", "socks5h://socks.corp")  # HTTPS_PROXY first
    assert models.hub_reachable() and asked[-1] == ("proxy.corp", 3128)
    monkeypatch.delenv("HTTPS_PROXY")
    assert models.hub_reachable() and asked[-1] == ("socks.corp", 1080)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert models.hub_reachable() and asked[-1] == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "hub.internal")  # no scheme: not an address
    assert not models.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models.hub_reachable() and len(asked) == 5

    # the probe is made once a minute per address, not once per call
    tries = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: tries.append(a) or (_ for _ in ()).throw(OSError))
    monkeypatch.setattr(models, "_PROBES", {})
    assert not connects(("hub.test", 443), 1.0) and not connects(("hub.test", 443), 1.0) and len(tries) == 1
    assert not connects(("hub.test", 443), 1.0, ttl=0) and len(tries) == 2


@pytest.mark.parametrize("calibration", ["none", "text"])
def test_a_hub_id_streamed_for_memory_builds_its_meta_model_once(tmp_path, monkeypatch, capsys, calibration):
    """A hub id has no early outline (local_outline): the memory check's plan built its meta model, then the streamed
    plan built another. The memory check's is handed, as built, to the streamed plan, as a local folder's is."""
    from .eval_helpers import count_loads

    remote, text = lm_folder(tmp_path)
    _fake_hub(tmp_path, monkeypatch, remote)
    calls = count_loads(monkeypatch)
    _room(monkeypatch, memory.checkpoint_bytes(remote) * 5 // 4)  # the model fits, not with its factors
    data = ["--calibration", str(text), "--method", "whiten", "--allocation", "uniform", "--calibration-samples", "2",
            "--calibration-length", "16"] if calibration == "text" else ["--calibration", "none"]  # fmt: skip
    assert main(["compress", "org/tiny", "--budget", "0.5", "--no-progress", *data, "-o", str(tmp_path / "out")]) == 0
    assert "streaming it instead" in capsys.readouterr().err
    assert len(calls["skeleton"]) == 1, calls["skeleton"]
    assert main(["compress", str(remote), "--budget", "0.5", "--no-progress", *data, "--stream", "-o",
                 str(tmp_path / "local")]) == 0  # fmt: skip
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "local")


def test_a_hub_id_too_large_for_memory_alone_builds_its_meta_model_once(tmp_path, monkeypatch, capsys):
    """A hub id not in the cache whose model alone does not fit is checked on config.json before its weights are
    downloaded (_downloaded_unless_refused): that meta model was built, then the memory check's plan built another
    (and before 575bfe5 the streamed plan a third). The first is taken over by the plan, then by the streamed run."""
    from .eval_helpers import count_loads

    remote, _ = lm_folder(tmp_path)
    _fake_hub(tmp_path, monkeypatch, remote)
    calls = count_loads(monkeypatch)
    _room(monkeypatch, memory.checkpoint_bytes(remote) // 2)  # the model alone does not fit: it must stream
    argv = ["compress", "org/tiny", "--budget", "0.5", "--no-progress", "--calibration", "none"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0
    assert "streaming it instead" in capsys.readouterr().err
    assert len(calls["skeleton"]) == 1, calls["skeleton"]
    assert main(["compress", str(remote), *argv[2:], "--stream", "-o", str(tmp_path / "local")]) == 0
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "local")


def _compress_eval_of_a_hub_id_not_in_the_cache(
    tmp_path: Path, monkeypatch, fits: bool = True
) -> tuple[list[list[str]], dict]:
    """``compress org/tiny --eval TEXT`` of a tiny GPT-2 on the fake hub, not in its cache: calibrated on TEXT
    where it ``fits`` in memory, else streamed uncalibrated (the model alone does not fit). The hub's downloads
    (``_fake_hub``), and the tokenizer loads and meta model builds (``count_loads``)."""
    from .eval_helpers import count_loads

    remote, text = lm_folder(tmp_path)
    asked = _fake_hub(tmp_path, monkeypatch, remote)
    calls = count_loads(monkeypatch)
    data = ["--calibration", str(text), "--calibration-samples", "2", "--calibration-length", "16"]
    if not fits:
        _room(monkeypatch, memory.checkpoint_bytes(remote) // 2)
        data = ["--calibration", "none"]
    argv = ["compress", "org/tiny", "-o", str(tmp_path / "out"), *data, "--eval", str(text), "--eval-limit", "2"]
    assert main([*argv, "--no-progress"]) == 0
    return asked, calls


def test_compress_eval_of_a_hub_id_asks_the_hub_for_each_file_set_once(tmp_path, monkeypatch):
    """compress HUB_ID --eval asked the hub for the side files three times: the --eval check (side_folder), the
    memory check (remote_parameters), then its download at that commit (local_checkpoint). Once now, in one run."""
    from svdlora import hub

    asked, _ = _compress_eval_of_a_hub_id_not_in_the_cache(tmp_path, monkeypatch)
    assert asked == [hub.SIDE_FILES, ["model.safetensors"]]


@pytest.mark.parametrize("fits", [True, False], ids=["fits", "too large for memory alone"])
def test_compress_eval_of_a_hub_id_not_in_the_cache_builds_its_meta_model_once(tmp_path, monkeypatch, fits):
    """The --eval check built a hub id's meta model from the id (its snapshot holding no weights yet), which the
    memory check's plan of the downloaded snapshot could not take over: it built another. The check builds it from
    the snapshot's config.json, and the memory check hands it to the plan (memory_choice._downloaded_unless_refused;
    too large for memory alone, the size check on config.json built one more before the plan took it over)."""
    asked, calls = _compress_eval_of_a_hub_id_not_in_the_cache(tmp_path, monkeypatch, fits)
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    assert calls["skeleton"] == [str(snapshot)]


def test_compress_checkpoint_of_a_hub_id_without_progress_shows_no_download_bar(tmp_path, monkeypatch, capsys):
    """compress_checkpoint('org/model', progress=False) hid only svdlora's bars: the hub download's bars (drawn with
    huggingface_hub's tqdm, off only by its switch) reached a Python caller; only the CLI's --no-progress hid them."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import tqdm as hub_tqdm

    from svdlora.streaming import compress_checkpoint

    remote = tmp_path / "remote"
    tied_llama().save_pretrained(remote)
    _fake_hub(tmp_path, monkeypatch, remote)
    fetch = huggingface_hub.snapshot_download

    def drawing(*args, **kwargs):  # as the real download: a bar of huggingface_hub's own tqdm
        for _ in hub_tqdm(range(3), desc="Fetching 3 files"):
            pass
        return fetch(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", drawing)
    capsys.readouterr()
    compress_checkpoint("org/tiny", tmp_path / "out", budget=0.5, progress=False)
    err = capsys.readouterr().err
    assert "Fetching 3 files" not in err and (tmp_path / "out" / "model.safetensors").is_file(), err
    assert not are_progress_bars_disabled()  # set back: the caller's other downloads keep their bars
