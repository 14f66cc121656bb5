"""Calibration-aware extraction: the delta factorized under the tuned model's input whitening."""

from __future__ import annotations

import json

import pytest
import torch

from svdlora.cli import main
from svdlora.errors import SvdloraError
from svdlora.extract import extract_adapter
from svdlora.integrations.peft_adapter import write_adapter
from svdlora.layers import weight_out_in

from .conftest import tiny_llama
from .eval_helpers import word_gpt2, word_text
from .test_extract import _load, _logits, fine_tune

peft = pytest.importorskip("peft")

WORDS = "the a cat dog sat ran on under mat tree and then it was big small red blue".split()


def _batches(count: int = 4, length: int = 24, vocab: int = 96) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=g)} for _ in range(count)]


def _layer_inputs(model, names, batches) -> dict[str, torch.Tensor]:
    """Every token's input to each named layer, (tokens, in), from running ``batches``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(xs).double() for n, xs in seen.items()}


def test_whitened_extraction_has_lower_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    tuned = fine_tune(base, delta_rank=16)  # more delta than rank 4 can hold
    batches = _batches()
    plain = extract_adapter(base, tuned, rank=4, progress=False)
    whitened = extract_adapter(base, tuned, rank=4, calibration=batches, progress=False)
    assert plain.method == "svd" and whitened.method == "whiten"  # 'auto' follows the data
    assert whitened.calibration["batches"] == len(batches)
    inputs = _layer_inputs(tuned, [m.name for m in plain.lora], batches)

    def output_error(extraction):
        errors = {}
        for m in extraction.lora:
            delta = (weight_out_in(tuned.get_submodule(m.name)) - weight_out_in(base.get_submodule(m.name))).double()
            residual = delta - m.lora_B.double() @ m.lora_A.double()
            errors[m.name] = (inputs[m.name] @ residual.T).norm().item()
        return errors

    got, ref = output_error(whitened), output_error(plain)
    assert [m.rank for m in whitened.lora] == [m.rank for m in plain.lora]  # same size
    # the whitened factors are optimal for the (1%-damped) output metric: never worse per layer,
    # clearly better in total
    assert all(got[n] <= ref[n] * 1.001 for n in ref), {n: got[n] / ref[n] for n in ref}
    assert sum(got.values()) < 0.95 * sum(ref.values())
    # while plain SVD is the better fit of the delta's entries, which is not what the model uses
    assert sum(m.rel_error for m in plain.lora) < sum(m.rel_error for m in whitened.lora)
    assert all(m.weighted_error is not None and m.weighted_error < 1 for m in whitened.lora)
    assert all(m.weighted_error is None for m in plain.lora)


@pytest.mark.parametrize("method", ["whiten", "fisher"])
def test_calibrated_full_rank_round_trip_is_exact(method, tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    tuned = fine_tune(base, delta_rank=2)
    batches = [{**b, "labels": b["input_ids"]} for b in _batches(count=2)]
    extraction = write_adapter(
        base, tuned, tmp_path / "a", rank=2, submatrices=2, method=method, calibration=batches, progress=False
    )
    assert extraction.method == method and all(m.ranks == [1, 1] for m in extraction.lora)
    assert (extraction.calibration["gradients"]) == (method == "fisher")
    got, want = _logits(_load(base, tmp_path / "a")), _logits(tuned)
    assert (got - want).abs().max() < 1e-4
    record = json.loads((tmp_path / "a" / "svdlora_adapter.json").read_text())
    assert record["method"] == method and record["calibration"]["batches"] == 2


def test_calibrated_method_without_data_is_refused():
    from svdlora.errors import SvdloraError

    torch.manual_seed(0)
    base = tiny_llama().eval()
    with pytest.raises(SvdloraError, match="needs calibration data"):
        extract_adapter(base, fine_tune(base), rank=2, method="whiten", progress=False)
    with pytest.raises(SvdloraError, match="allocation 'global'"):
        extract_adapter(base, fine_tune(base), budget=0.3, allocation="global", calibration=_batches(), progress=False)


@pytest.fixture
def lm_pair(tmp_path):
    """A tiny GPT-2 base and fine-tune saved with a word tokenizer, and a text to calibrate on."""
    base, tok = word_gpt2(WORDS)
    tuned = fine_tune(base, delta_rank=8)
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "train.txt").write_text(word_text(WORDS))
    return tmp_path


def test_cli_calibrates_with_data_and_defaults_to_plain_svd(lm_pair, capsys):
    root = lm_pair
    common = ["extract", "--base", str(root / "base"), "--tuned", str(root / "tuned"), "--budget", "0.3",
              "--no-progress"]  # fmt: skip
    assert main([*common, "--output", str(root / "plain")]) == 0
    record = json.loads((root / "plain" / "svdlora_adapter.json").read_text())
    assert record["method"] == "svd" and record["calibration"] is None
    calibrated = ["--calibration", str(root / "train.txt"), "--calibration-samples", "3", "--calibration-length", "16"]
    assert main([*common, *calibrated, "--output", str(root / "cal")]) == 0
    record = json.loads((root / "cal" / "svdlora_adapter.json").read_text())
    assert record["method"] == "whiten" and record["calibration"]["batches"] == 3
    assert record["calibration"]["source"] == str(root / "train.txt")
    assert "train.txt" in (root / "cal" / "README.md").read_text()
    assert "train.txt" in capsys.readouterr().out  # the summary names the data


def test_cli_method_without_calibration_is_one_line_before_loading(lm_pair, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("models must not be loaded")

    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--method", "whiten", "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs calibration data" in err[0]
    assert not (lm_pair / "a").exists()


def test_cli_calibration_without_the_tuned_tokenizer_is_one_line_before_loading(lm_pair, capsys, monkeypatch):
    """Both models were loaded before the tuned folder was found to hold no tokenizer to read the data."""

    def never(*args, **kwargs):
        raise AssertionError("models must not be loaded")

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (lm_pair / "tuned" / name).unlink(missing_ok=True)
    monkeypatch.setattr("svdlora.models.load_pretrained", never)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--calibration", str(lm_pair / "train.txt"), "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load the tokenizer" in err[0], err
    assert not (lm_pair / "a").exists()


def test_statistics_collected_once_give_the_same_adapter():
    """Found by review: statistics= without calibration= was ignored (method 'auto': plain SVD), as compress
    ignored them before 684ddd3; now refused as there."""
    from svdlora.calibration import collect_statistics
    from svdlora.config import CompressionConfig
    from svdlora.targets import find_targets

    torch.manual_seed(0)
    base = tiny_llama().eval()
    tuned = fine_tune(base, delta_rank=16)
    batches = _batches(count=2)
    stats = collect_statistics(tuned, find_targets(tuned, CompressionConfig())[0], batches, False, False)
    once = extract_adapter(base, tuned, budget=0.3, calibration=batches, statistics=stats, progress=False)
    fresh = extract_adapter(base, tuned, budget=0.3, calibration=batches, progress=False)
    with pytest.raises(SvdloraError, match=r"statistics were given without calibration: .*'auto' is whiten with"):
        extract_adapter(base, tuned, budget=0.3, statistics=stats, progress=False)
    assert all(
        torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        for a, b in zip(once.lora, fresh.lora, strict=True)
    )


def test_cli_calibration_auto_with_plain_svd_is_none_as_in_compress(lm_pair, capsys, caplog, monkeypatch):
    """extract called resolve_calibration without the config, so --calibration auto with plain SVD under a
    fixed rank meant 'self' once the models were loaded (compress and sweep: none, as processor_before_load
    said for extract too), handed to write_adapter, which warned a second time that it was not used. It now
    resolves to none, as in compress and sweep."""
    import svdlora.calibration_data

    def never(*args, **kwargs):
        raise AssertionError("no calibration text may be generated for plain SVD")

    monkeypatch.setattr(svdlora.calibration_data, "calibration_batches", never)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--calibration", "auto", "--method", "svd", "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((lm_pair / "a" / "svdlora_adapter.json").read_text())
    assert record["method"] == "svd" and record["calibration"] is None
    assert caplog.text.count("calibration data is not used") == 1, caplog.text  # said once, before the load


@pytest.mark.parametrize("calibration", ["train.txt", "self"])
def test_cli_data_that_plain_svd_leaves_unread_is_said_once_and_not_loaded(lm_pair, caplog, monkeypatch, calibration):
    """extract --calibration DATA (or self) --method svd warned that the data is not used twice, before the load
    (resolve_method) and again in write_adapter, and loaded the tuned model's tokenizer for it: once, none."""
    from .eval_helpers import count_loads

    data = str(lm_pair / calibration) if calibration.endswith(".txt") else calibration
    calls = count_loads(monkeypatch)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--calibration", data, "--method", "svd", "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((lm_pair / "a" / "svdlora_adapter.json").read_text())["calibration"] is None
    assert caplog.text.count("calibration data is not used") == 1, caplog.text
    assert calls["tokenizer"] == []


@pytest.mark.parametrize(("method", "built"), [("svd", 0), ("whiten", 1)])
def test_trust_remote_code_builds_the_tuned_meta_model_only_for_read_data(lm_pair, monkeypatch, method, built):
    """extract --trust-remote-code compares no pair before the load, but builds the tuned meta model (running its own
    code) for the calibration's checks: it did so for --calibration DATA --method svd too, whose data is not read and
    not checked; only where the method reads the data now."""
    from .eval_helpers import count_loads

    calls = count_loads(monkeypatch)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--calibration", str(lm_pair / "train.txt"), "--calibration-samples", "2", "--calibration-length", "16",
            "--method", method, "--trust-remote-code", "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert calls["skeleton"] == [str(lm_pair / "tuned")] * built


def test_cli_builds_the_tuned_meta_model_once(lm_pair, monkeypatch):
    """extract --calibration DATA built the tuned folder's meta model twice before the load (the pair's comparison,
    then the calibration's check): the comparison's is passed on."""
    from .eval_helpers import count_loads

    calls = count_loads(monkeypatch)
    argv = ["extract", "--base", str(lm_pair / "base"), "--tuned", str(lm_pair / "tuned"), "--rank", "2",
            "--calibration", str(lm_pair / "train.txt"), "--calibration-samples", "2", "--calibration-length", "16",
            "--output", str(lm_pair / "a"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert calls["skeleton"] == [str(lm_pair / "base"), str(lm_pair / "tuned")]
