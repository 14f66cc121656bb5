"""Property: a damaged compressed folder either works exactly like the intact one or is refused
with one line (exit 2) by info, load_compressed, eval and export; never a traceback, never a
model with other outputs. Seeded random damage: truncation, dropped / renamed / reshaped
tensors, deleted files, edited svdlora_config.json fields."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import svdlora
from svdlora.cli import main
from svdlora.errors import SvdloraError
from svdlora.io import CONFIG_NAME, WEIGHTS_NAME

from .eval_helpers import CONFIG_DAMAGE, damage_config
from .test_safety import made  # noqa: F401  (the shared module fixture)

CASES = 40
IDS = torch.arange(1, 13).unsqueeze(0)
EVAL = ["--task", "text-generation", "--device", "cpu", "--no-progress", "--max-length", "16", "--limit", "2"]
VALUES = [None, True, False, 0, 1, -1, 2, 10**9, 0.5, "x", "", [], [1], [0, 0], {}, "linear", "conv1d", "GPT2Model"]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    yield path


def _rewrite_tensors(folder: Path, change) -> None:
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def damage(folder: Path, rng: random.Random) -> str:
    """Damage ``folder`` in one random way; returns what was done (shown when a case fails)."""
    kind = rng.choice(["truncate", "drop", "rename", "reshape", "delete", "edit", "edit", "edit", "harmless"])
    if kind == "harmless":  # fields that describe the run, not the model: must keep working
        data = json.loads((folder / CONFIG_NAME).read_text())
        field = rng.choice(["seconds", "bytes_before", "config"])
        data["report"][field] = {"seconds": 12.5, "bytes_before": None, "config": {"budget": 0.9}}[field]
        data["report"]["modules"][0]["rel_error"] = 0.25
        (folder / CONFIG_NAME).write_text(json.dumps(data))
        return f"harmless edit of report.{field}"
    if kind == "truncate":
        file = folder / rng.choice([WEIGHTS_NAME, CONFIG_NAME, "config.json"])
        data = file.read_bytes()
        cut = rng.randrange(len(data))
        file.write_bytes(data[:cut])
        return f"truncate {file.name} at {cut}"
    if kind == "delete":
        name = rng.choice([WEIGHTS_NAME, CONFIG_NAME, "config.json", "tokenizer.json"])
        (folder / name).unlink(missing_ok=True)
        return f"delete {name}"
    if kind in ("drop", "rename", "reshape"):
        keys = sorted(load_file(folder / WEIGHTS_NAME))
        key = rng.choice(keys)

        def change(tensors):
            if kind == "drop":
                tensors.pop(key)
            elif kind == "rename":
                tensors[key.replace("stage0", "stage5") if "stage0" in key else key + "_x"] = tensors.pop(key)
            else:
                t = tensors[key]
                tensors[key] = torch.zeros(*[s + 1 for s in t.shape], dtype=t.dtype) if t.ndim else t

        _rewrite_tensors(folder, change)
        return f"{kind} {key}"
    file = folder / CONFIG_NAME
    data = json.loads(file.read_text())
    path = rng.choice([p for p in _leaves(data) if p])
    node = data
    for step in path[:-1]:
        node = node[step]
    value = rng.choice(VALUES)
    node[path[-1]] = value
    file.write_text(json.dumps(data))
    return f"set {'.'.join(map(str, path))} = {value!r}"


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # only the command's output: the loads between commands draw transformers' bars
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _dense_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(IDS).logits


@pytest.fixture(scope="module")
def intact(made, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("intact")
    with torch.no_grad():
        logits = svdlora.load_compressed(made / "svd", device="cpu")(IDS).logits
    main(["eval", str(made / "svd"), "--data", str(made / "text.txt"), *EVAL, "--json", str(root / "r.json")])
    ppl = json.loads((root / "r.json").read_text())["model"]["metrics"]["perplexity"]
    return {"logits": logits, "perplexity": ppl}


def test_damaged_folders_work_exactly_or_fail_in_one_line(made, intact, tmp_path, capsys):  # noqa: F811
    outcomes = {"works": 0, "refused": 0}
    for case in range(CASES):
        rng = random.Random(case)
        folder = tmp_path / f"case{case}"
        shutil.copytree(made / "svd", folder)
        what = damage(folder, rng)

        def one_line(code, err, command, what=what):
            assert code in (0, 2), f"{what}: {command} exit {code}: {err}"
            if code == 2:
                assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{what}: {command}: {err}"
            return code == 0

        one_line(*cli(capsys, "info", folder), "info")
        try:
            with torch.no_grad():
                logits = svdlora.load_compressed(folder, device="cpu")(IDS).logits
            torch.testing.assert_close(logits, intact["logits"], msg=f"{what}: other logits")
            outcomes["works"] += 1
        except SvdloraError:
            outcomes["refused"] += 1
        result = tmp_path / f"r{case}.json"
        if one_line(*cli(capsys, "eval", folder, "--data", made / "text.txt", *EVAL, "--json", result), "eval"):
            ppl = json.loads(result.read_text())["model"]["metrics"]["perplexity"]
            assert ppl == pytest.approx(intact["perplexity"], rel=1e-4), what
        out = tmp_path / f"dense{case}"
        if one_line(*cli(capsys, "export", folder, "--dense", "--output", out), "export"):
            torch.testing.assert_close(_dense_logits(out), intact["logits"], rtol=1e-4, atol=1e-5, msg=what)
    # the damage must exercise both outcomes, or the test proves little
    assert outcomes["works"] >= 3 and outcomes["refused"] >= 10, outcomes


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_config_it_cannot_read_is_refused_on_load(made, tmp_path, capsys, damage):  # noqa: F811
    """transformers 5 checks config field types with huggingface_hub's own error, not a ValueError:
    load_compressed of a folder whose config.json holds "n_layer": "two" raised it raw, and info/eval said
    'internal error'; it is the folder's refusal, naming the field. So are an unknown model_type and a
    config.json that is not JSON (the dense model's builders: test_cli's test_a_config_it_cannot_read_...)."""
    folder = tmp_path / "svd"
    shutil.copytree(made / "svd", folder)
    says = damage_config(folder, damage)
    with pytest.raises(SvdloraError, match="no usable config.json") as refused:
        svdlora.load_compressed(folder, device="cpu")
    assert len(str(refused.value).splitlines()) == 1 and all(said in str(refused.value) for said in says), refused
    code, err = cli(capsys, "eval", folder, "--data", made / "text.txt", *EVAL)
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(said in err for said in says), err
