"""Refit with stored-precision stages (issue 9 follow-up): the refit target goes through the quantized chain."""

from __future__ import annotations

import torch

import svdlora
from svdlora.chain import quantized_chain
from svdlora.methods import Weighting
from svdlora.precision import stage_formats
from svdlora.refit import refit_target

from .conftest import TINY_MODELS, example_inputs
from .test_calibration import _linear_stats, correlated_inputs


def _product(stages) -> torch.Tensor:
    return sum(s.product() for s in stages).float()


def test_refit_chain_fits_the_dense_output_from_shifted_inputs_better():
    # The same setting as the float refit test, stored as full-int4 + an int8 repair stage.
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    x = correlated_inputs(500, 32)
    x_tilde = x + 0.3 * correlated_inputs(500, 32, seed=1)  # what a compressed upstream feeds the layer
    gram, cross = (x_tilde.T @ x_tilde).double() / 500, (x.T @ x_tilde).double() / 500
    error = lambda w: (x @ weight.T - x_tilde @ w.T).norm().item()  # noqa: E731
    for names, ranks in ((["int8"], [6, 6]), (["full-int4", "int8"], [0, 6])):
        formats = stage_formats(names, 2, torch.float32)
        target, metric = refit_target(weight, gram, cross, left=None, damping=1e-6)
        # as compress does: a full first stage stays the quantized weight, the repair is refitted
        base = quantized_chain(weight, [0], formats[:1])[0] if formats[0].full else None
        refit = _product(quantized_chain(target, ranks, formats, metric, base=base))
        whitening = Weighting.from_stats(_linear_stats(weight, x_tilde), False)
        plain = _product(quantized_chain(weight, ranks, formats, whitening))
        assert error(refit) < 0.95 * error(plain), names


def test_calibrated_quantized_model_is_refitted_and_reloads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dense = TINY_MODELS["llama"]().eval()
    batches = [{"input_ids": torch.randint(0, dense.config.vocab_size, (1, 16), generator=g)} for _ in range(3)]
    reports, models = {}, {}
    for refit in (False, True):
        models[refit] = TINY_MODELS["llama"]().eval()
        models[refit].load_state_dict(dense.state_dict())
        reports[refit] = svdlora.compress(
            models[refit], budget=0.5, submatrices=2, stage_dtypes="full-int4,int8", refit=refit, refit_stages=refit,
            calibration=batches, progress=False,
        )  # fmt: skip
    assert reports[True].calibration["refit"] and not reports[False].calibration["refit"]
    # without refit_stages the default refit is skipped for stage dtypes (it measured worse on SmolLM2)
    default = TINY_MODELS["llama"]().eval()
    default.load_state_dict(dense.state_dict())
    kwargs = {"budget": 0.5, "submatrices": 2, "stage_dtypes": "full-int4,int8", "progress": False}
    assert not svdlora.compress(default, calibration=batches, **kwargs).calibration["refit"]
    before, after = reports[False].factorized, reports[True].factorized
    # the same ranks, formats and bytes; different stages
    assert [(m.ranks, m.stage_dtypes, m.stored_bytes) for m in before] == [
        (m.ranks, m.stage_dtypes, m.stored_bytes) for m in after
    ]
    assert any(a.rel_error != b.rel_error for a, b in zip(before, after, strict=True))
    for name, module in models[True].named_modules():  # the quantized weight is kept, the repair refitted
        if getattr(module, "stored", None) is not None:
            other = models[False].get_submodule(name).stored
            assert all(torch.equal(t, other[0]["W"][k]) for k, t in module.stored[0]["W"].items())
            assert not torch.equal(module.stored[1]["B"]["q"], other[1]["B"]["q"])
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = models[True](**inputs).logits
    loaded = svdlora.load_compressed(svdlora.save_compressed(models[True], tmp_path / "q"), device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
