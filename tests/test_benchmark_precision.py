"""benchmarks.precision with calibration, end to end on a tiny model: statistics collected once."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import precision
from tests.conftest import tiny_llama
from tests.eval_helpers import word_tokenizer

WORDS = "the a cat dog sat ran on under mat tree and then it was big small red blue".split()


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = tiny_llama().eval(), word_tokenizer(WORDS)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    for split in ("valid", "test"):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (400,), generator=g)]
        (tmp_path / f"{split}.txt").write_text(" ".join(words) + "\n")
    return tmp_path


def test_calibrated_rows_collect_the_statistics_once(folder, monkeypatch):
    import svdlora.calibration

    calls = []
    collect = svdlora.calibration.collect_statistics
    monkeypatch.setattr(svdlora.calibration, "collect_statistics", lambda *a, **k: calls.append(1) or collect(*a, **k))
    monkeypatch.setattr(svdlora.plan, "collect_statistics", lambda *a, **k: pytest.fail("compress collected again"))
    results, cache = folder / "res", folder / "stats.pt"
    common = ["--model", str(folder / "model"), "--data", str(folder / "test.txt"), "--limit", "2", "--length", "32",
              "--calibration", str(folder / "valid.txt"), "--samples", "3", "--statistics", str(cache),
              "--results", str(results), "--part", "levels", "--bits", "8"]  # fmt: skip
    precision.main([*common, "--recipes", "one bfloat16 stage", "full-int4 + int8 repair"])
    precision.main([*common, "--recipes", "full-int4 + int8 repair", "--refit"])  # statistics from the cache
    # benchmarks.quality's cache of the same collection, (batches, stats, seconds), is read as well
    saved = torch.load(cache, weights_only=False)
    torch.save((saved["batches"], saved["stats"], saved["seconds"]), folder / "quality.pt")
    common[common.index(str(cache))] = str(folder / "quality.pt")
    precision.main([*common, "--recipes", "one bfloat16 stage", "--refit"])
    precision.main([*common, "--recipes", "full-int4 + int8 repair", "--method", "kfac"])  # its own row
    assert len(calls) == 1 and cache.is_file()
    data = json.loads((results / "precision_levels_calibrated.json").read_text())
    rows = {r["recipe"]: r for r in data["rows"]}
    assert set(rows) == {
        "one bfloat16 stage", "full-int4 + int8 repair", "full-int4 + int8 repair + refit",
        "one bfloat16 stage + refit", "full-int4 + int8 repair (kfac)",
    }  # fmt: skip
    assert rows.pop("full-int4 + int8 repair (kfac)")["method"] == "kfac"
    assert all(r["method"] == "fisher" and r["allocation"] == "global" for r in rows.values())
    assert rows["full-int4 + int8 repair + refit"]["refit"] and not rows["full-int4 + int8 repair"]["refit"]
    assert all(r["bits_per_weight"] <= 8.0 + 1e-9 and r["perplexity"] > 1 for r in rows.values())
    precision.main(["--report", "--results", str(results)])
    text = (results / "precision.md").read_text()
    assert "Calibrated, plain SVD and round-to-nearest side by side" in text
    assert "full-int4 + int8 repair" in text


def test_a_run_without_part_is_refused_before_the_model_loads(folder, capsys):
    with pytest.raises(SystemExit) as exc:
        precision.main(["--model", str(folder / "model"), "--data", str(folder / "test.txt"), "--results", str(folder)])
    assert exc.value.code == 2 and "--part is required (or --report)" in capsys.readouterr().err
