"""Issues 8-11 together: calibration with quantized stages and a byte budget, and what each loader does."""

from __future__ import annotations

import pytest
import torch
import transformers

import svdlora

from .conftest import TINY_MODELS, example_inputs


def _batches(vocab: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (1, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("stage_dtypes", ["int8", "full-int4,int8"])
def test_calibrated_quantized_model_reloads_with_the_same_logits(tmp_path, stage_dtypes):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    report = svdlora.compress(
        model, budget=0.5, submatrices=2, stage_dtypes=stage_dtypes,
        calibration=_batches(model.config.vocab_size), progress=False,
    )  # fmt: skip
    assert report.method == "kfac" and report.allocation == "global"  # calibration's defaults
    fac = report.factorized
    assert fac and all(",".join(m.stage_dtypes).startswith(stage_dtypes.split(",")[0]) for m in fac)
    # the byte budget holds over the targeted matrices, scales included
    targeted = [m for m in report.modules if m.dense_reason is None or m.factorized]
    assert sum(m.stored_bytes for m in fac) <= 0.5 * sum(m.params_before * 4 for m in targeted) + 1
    # quantized stages may hold more values than dense, in fewer bits: the summary says which counts
    more_values = sum(m.params_after for m in fac) > sum(m.params_before for m in fac)
    assert more_values == ("the bytes below are the size" in report.format())
    assert more_values or not stage_dtypes.startswith("full")  # a full-rank first stage: always more
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    folder = svdlora.save_compressed(model, tmp_path / "q")
    loaded = svdlora.load_compressed(folder, device="cpu")
    merged = svdlora.load_compressed(folder, device="cpu", merge=True)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    # plain from_pretrained does not load quantized stages: it refuses, naming the loader that does
    with pytest.raises(ValueError, match="load_compressed"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_global_allocation_counts_bytes_with_stage_dtypes(tmp_path):
    # The same byte budget buys ~4x the rank in int8 stages as in float32 ones.
    torch.manual_seed(0)
    plain, quant = TINY_MODELS["llama"]().eval(), TINY_MODELS["llama"]().eval()
    quant.load_state_dict(plain.state_dict())
    calibration = _batches(plain.config.vocab_size)
    a = svdlora.compress(plain, budget=0.3, calibration=calibration, progress=False)
    b = svdlora.compress(quant, budget=0.3, stage_dtypes="int8", calibration=calibration, progress=False)
    assert a.allocation == b.allocation == "global"
    rank_a = sum(sum(m.ranks) for m in a.factorized)
    rank_b = sum(sum(m.ranks) for m in b.factorized)
    assert rank_b > 2.5 * rank_a
    assert sum(m.stored_bytes for m in b.factorized) <= 0.3 * sum(m.dense_bytes for m in b.factorized)


def test_exact_svd_stays_the_default():
    # issue 10 made --svd auto the default; the integration keeps exact (reproducible factors), auto opt-in
    from svdlora.cli import build_parser
    from svdlora.config import CompressionConfig

    assert CompressionConfig().svd_method == "exact"
    args = build_parser().parse_args(["compress", "m", "-o", "x"])
    assert args.svd_method == "exact" and args.calibration == "auto"
    assert build_parser().parse_args(["compress", "m", "-o", "x", "--svd", "auto"]).svd_method == "auto"


@pytest.mark.parametrize("stage_dtypes", [None, "full-int4,int8"])
def test_the_card_s_loading_code_runs(tmp_path, stage_dtypes):
    """The folder's README.md shows code that loads it: run it as written (with the folder's path)."""
    import re

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]().eval()
    report = svdlora.compress(model, budget=0.5, submatrices=2, stage_dtypes=stage_dtypes, progress=False)
    folder = svdlora.save_compressed(model, tmp_path / "c", report=report)
    card = (folder / "README.md").read_text()
    code = re.search(r"## Use\n\n```python\n(.*?)```", card, re.S).group(1).replace("<this folder>", str(folder))
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102  the card's own code
    with torch.no_grad():
        torch.testing.assert_close(
            namespace["model"](**{k: v.to(namespace["model"].device) for k, v in example_inputs("llama").items()})
            .logits.cpu(),
            model(**example_inputs("llama")).logits,
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip
