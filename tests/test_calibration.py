"""Calibration-aware compression (issue 8): whitening, refit, global allocation, healing, bad input."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch import nn

import svdlora
from svdlora import calibration, padding
from svdlora import heal as heal_module
from svdlora.allocate import allocate_global, allocate_ranks
from svdlora.calibration import LayerStats, _Accumulator, _hooks, collect_statistics
from svdlora.calibration_data import generate_text
from svdlora.cli import main
from svdlora.config import CompressionConfig
from svdlora.decompose import relative_error, residual_svd
from svdlora.errors import SvdloraError
from svdlora.heal import FINAL_LR_FRACTION, WARMUP_STEPS, _distill_inputs, heal, learning_rate
from svdlora.layers import LowRankLinear, weight_out_in
from svdlora.methods import Weighting, factorize
from svdlora.methods.weighting import whitening
from svdlora.plan import auto_method, output_gram_bytes
from svdlora.precision import allocate_bytes, layer_bytes, stage_formats, target_bytes
from svdlora.refit import collect_cross_statistics, refit_factors
from svdlora.targets import Target, factor_params, find_targets

from .conftest import example_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama, tiny_marian
from .eval_helpers import word_gpt2, word_text

WORDS = "the a cat dog sat ran on under mat tree and then it was big small red blue".split()


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim)
    return torch.randn(n, dim, generator=g) @ mixing.T


def rebuilt(stages) -> torch.Tensor:
    return sum(a @ b for a, b in stages).float()


def test_whitening_lowers_the_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 32), correlated_inputs(400, 32)
    stats = _linear_stats(weight, x)
    plain = rebuilt(residual_svd(weight, [6]))
    whitened = rebuilt(factorize(weight, [6], Weighting.from_stats(stats, use_gradients=False)))
    error = lambda w: ((x @ (weight - w).T).norm() / (x @ weight.T).norm()).item()  # noqa: E731
    assert error(whitened) < 0.8 * error(plain)
    # and the weights themselves are not what whitening optimizes: plain SVD is best there
    assert (weight - plain).norm() <= (weight - whitened).norm() + 1e-5


def test_kfac_lowers_the_kronecker_factored_loss_below_diagonal_fisher():
    """With correlated output gradients, whitening the output side (K-FAC) beats its diagonal (FWSVD)
    in the loss both approximate, tr(δW·E[xxᵀ]·δWᵀ·E[ggᵀ])."""
    torch.manual_seed(0)
    weight, x, g = torch.randn(24, 32), correlated_inputs(400, 32), correlated_inputs(400, 24, seed=1)
    gram, grad_gram = (x.T @ x).double() / 400, (g.T @ g).double() / 400
    stats = LayerStats(gram=gram, tokens=400, out_grad_sq=grad_gram.diagonal().clone(), out_grad_gram=grad_gram)
    loss = lambda w: torch.trace((weight - w).double() @ gram @ (weight - w).double().T @ grad_gram).item()  # noqa: E731
    fisher = rebuilt(factorize(weight, [6], Weighting.from_stats(stats)))
    kfac = rebuilt(factorize(weight, [6], Weighting.from_stats(stats, full_output=True)))
    assert loss(kfac) < 0.9 * loss(fisher)


def test_output_gradient_gram_is_collected_with_its_diagonal():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    targets = [Target("0", layer, "linear", 10, 12)]
    batches = [{"input": torch.randn(30, 12)} for _ in range(2)]
    stats = collect_statistics(nn.Sequential(layer), targets, batches, progress=False, output_gram=True)["0"]
    assert stats.out_grad_gram.shape == (10, 10) and stats.out_grad_gram.dtype == torch.float64
    torch.testing.assert_close(stats.out_grad_gram.diagonal(), stats.out_grad_sq)
    without = collect_statistics(nn.Sequential(layer), targets, batches, progress=False)["0"]
    assert without.out_grad_gram is None  # only method "kfac" pays for the (out, out) Gram


def test_statistics_are_the_float64_sums_of_float32_products_bit_for_bit():
    """The sums reuse work buffers per shape; with as many tokens per batch as outputs, the buffer of
    the squared gradients and the one of the output Gram have the same shape: still the plain sums."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    targets = [Target("0", layer, "linear", 10, 10)]
    batches = [{"input": torch.randn(10, 10)} for _ in range(3)]
    inputs, grads = [], []

    def record(module, args, out):
        inputs.append(args[0].detach())
        out.register_hook(lambda g: grads.append(g.detach()))

    handle = layer.register_forward_hook(record)
    stats = collect_statistics(nn.Sequential(layer), targets, batches, progress=False, output_gram=True)["0"]
    handle.remove()
    assert len(inputs) == len(grads) == 3
    x, g = inputs[0], grads[0]
    gram, grad_sq, grad_gram = (x.T @ x).double(), g.double().square().sum(0), (g.T @ g).double()
    for x in inputs[1:]:
        gram += (x.T @ x).double()
    for g in grads[1:]:
        grad_sq = grad_sq + g.double().square().sum(0)
        grad_gram += (g.T @ g).double()
    assert torch.equal(stats.gram, gram / 30) and torch.equal(stats.out_grad_sq, grad_sq / 30)
    assert torch.equal(stats.out_grad_gram, grad_gram / 30)


class _TwoRanks:
    """Rank 0 of two, in one process: its collectives see the other rank's accumulator as it stands."""

    active, rank, world_size = True, 0, 2

    def __init__(self, other: _Accumulator) -> None:
        self.other, self.calls = other, 0

    def gather(self, obj):
        o = self.other
        return [obj, ((sorted(o.gram_sums), sorted(o.grad_grams), sorted(o.grad_sums)), o.tokens, o.grad_tokens)]

    def all_reduce_sum(self, tensors):
        theirs = (self.other.gram_sums, self.other.grad_grams, self.other.grad_sums)[self.calls]
        self.calls += 1
        for tensor, key in zip(tensors, sorted(theirs), strict=True):
            tensor += theirs[key]


def _accumulate(targets, model, batches) -> _Accumulator:
    accumulator = _Accumulator(targets, gradients=True, output_gram=True)
    with _hooks(targets, accumulator):
        for x in batches:
            accumulator.new_batch()
            out = model(x)
            accumulator.add_gradients(torch.autograd.grad(out.square().sum(), [o for _, o, _ in accumulator.outputs]))
    accumulator.new_batch()
    return accumulator


def test_statistics_summed_over_ranks_equal_one_process_up_to_round_off():
    """Under torchrun each rank runs its own windows; the sums and token counts are then added."""
    torch.manual_seed(0)
    q, k, up = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 8)

    def model(x):
        h = q(x)
        return h.sum(-1, keepdim=True) * k(x).mean(-1, keepdim=True) + up(h).sum(-1, keepdim=True)

    targets = [Target("q", q, "linear", 6, 6), Target("k", k, "linear", 4, 6), Target("up", up, "linear", 8, 6)]
    batches = [torch.randn(n, 6) for n in (5, 7, 3, 9)]
    one = _accumulate(targets, model, batches).result()
    other = _accumulate(targets, model, batches[2:])
    mine = _accumulate(targets, model, batches[:2])
    mine.sum_over_ranks(_TwoRanks(other))
    two = mine.result()
    assert one.keys() == two.keys() == {"q", "k", "up"}
    for name, stats in one.items():
        assert two[name].tokens == stats.tokens == 24
        for field in ("gram", "out_grad_sq", "out_grad_gram"):
            torch.testing.assert_close(getattr(two[name], field), getattr(stats, field), rtol=1e-12, atol=1e-12)
    other = _accumulate(targets[:2], model, batches[2:])  # a rank whose windows missed a layer
    with pytest.raises(SvdloraError, match="different layers"):
        _accumulate(targets, model, batches[:2]).sum_over_ranks(_TwoRanks(other))


def test_whitening_roots_are_cholesky_factors_and_give_the_symmetric_roots_factors():
    """S·Sᵀ is the damped Gram, S⁻¹ its inverse; the factors it gives, mapped back by solving with
    the triangular S (no S⁻¹ kept), are those of the symmetric roots and their inverse (any square
    roots give the same best Ŵ), as are those of symmetric roots solved without an inverse; a Gram
    indefinite beyond the damping falls back to the eigendecomposition's symmetric root."""
    torch.manual_seed(0)
    x, g = correlated_inputs(400, 12), torch.randn(400, 10)
    gram, grad_gram = (x.T @ x).double() / 400, (g.T @ g).double() / 400
    right, inverse = whitening(gram, 0.01)
    damped = gram + 0.01 * gram.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(right @ right.T, damped)
    torch.testing.assert_close(inverse @ right, torch.eye(12, dtype=torch.float64))
    assert torch.equal(right, right.tril())  # a Cholesky factor, not the symmetric root
    weight = torch.randn(10, 12, dtype=torch.float64)
    stats = LayerStats(gram=gram, tokens=400, out_grad_sq=grad_gram.diagonal().clone(), out_grad_gram=grad_gram)
    solved = Weighting.from_stats(stats, full_output=True)
    assert solved.right_inverse is None and whitening(gram, 0.01, inverse=False)[1] is None
    cholesky = rebuilt(factorize(weight, [4], solved))
    values, vectors = torch.linalg.eigh(damped)
    d_values, d_vectors = torch.linalg.eigh(grad_gram + 0.01 * grad_gram.diagonal().mean() * torch.eye(10).double())
    symmetric = Weighting(
        left=(d_vectors * d_values.sqrt()) @ d_vectors.T,
        right=(vectors * values.sqrt()) @ vectors.T,
        right_inverse=(vectors / values.sqrt()) @ vectors.T,
    )
    torch.testing.assert_close(cholesky, rebuilt(factorize(weight, [4], symmetric)), rtol=1e-5, atol=1e-6)
    solved_symmetric = Weighting(left=symmetric.left, right=symmetric.right)  # not triangular: LU solves
    torch.testing.assert_close(cholesky, rebuilt(factorize(weight, [4], solved_symmetric)), rtol=1e-5, atol=1e-6)
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    right, inverse = whitening(indefinite, 0.01)
    torch.testing.assert_close(right, right.T)  # the eigendecomposition's root, negatives clipped
    torch.testing.assert_close(inverse @ right, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(right.diagonal() ** 2, torch.tensor([1.005, 1.005, 0.005], dtype=torch.float64))
    assert whitening(indefinite, 0.01, inverse=False)[1] is None


def test_auto_method_is_kfac_unless_its_output_grams_would_not_fit(monkeypatch):
    targets, _ = find_targets(tiny_llama(), CompressionConfig())
    assert auto_method(targets) == "kfac"
    monkeypatch.setattr("svdlora.plan.KFAC_AUTO_BYTES", output_gram_bytes(targets) - 1)
    assert auto_method(targets) == "fisher"


def test_kfac_model_saves_and_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batches = [example_inputs("llama", s) | {"labels": example_inputs("llama", s)["input_ids"]} for s in range(4)]
    report = svdlora.compress(model, budget=0.6, method="kfac", calibration=batches, progress=False)
    assert report.method == "kfac" and report.allocation == "global"
    expected = output_of(model, "llama")
    svdlora.save_compressed(model, tmp_path / "out")
    loaded = svdlora.load_compressed(tmp_path / "out", device="cpu")
    torch.testing.assert_close(output_of(loaded, "llama"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inputs", ["zero", "rank-deficient", "one-token"])
def test_degenerate_calibration_inputs_give_finite_factors(inputs):
    torch.manual_seed(0)
    weight = torch.randn(16, 20)
    x = {
        "zero": torch.zeros(50, 20),
        "rank-deficient": torch.randn(50, 3) @ torch.randn(3, 20),  # Gram of rank 3
        "one-token": torch.randn(1, 20),
    }[inputs]
    stats = _linear_stats(weight, x)
    for use_gradients in (False, True):
        stages = factorize(weight, [4, 4], Weighting.from_stats(stats, use_gradients))
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in stages)
        assert (weight - rebuilt(stages)).norm() < weight.norm() * 2  # sane, not blown up by S⁻¹


@pytest.mark.parametrize(
    ("zeroed", "said"),
    [
        (
            "self_attn.o_proj.weight",
            "the output gradients of layer model.layers.1.self_attn.q_proj are all zero (the loss does not reach it): ",
        ),
        (
            "input_layernorm.weight",
            "the calibration inputs of layers model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, "
            "model.layers.1.self_attn.v_proj are all zero: ",
        ),
    ],
    ids=["output-gradients", "inputs"],
)
def test_a_zero_gram_is_said_with_what_is_zero_and_which_layer(zeroed, said, caplog):
    """K-FAC whitens the output gradients' Gram as the inputs' one: where the loss does not reach a layer, its
    zero output gradients were said as 'calibration inputs of a layer are all zero'. q/k/v read one input, whitened
    once: its warning named q_proj alone."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[1].get_parameter(zeroed).zero_()  # o_proj: the loss no longer reaches q/k/v
    batches = [example_inputs("llama", s) for s in range(2)]
    svdlora.compress(model, budget=0.5, method="kfac", allocation="uniform", calibration=batches, progress=False)
    assert said in caplog.text
    assert ("calibration inputs" in said) == ("calibration inputs" in caplog.text)


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_each_layer_the_loss_does_not_reach_is_said_once(method, caplog):
    """fisher dropped the output weights of a layer whose loss gradients are all zero without a word (kfac said it
    of their Gram, and must not say it again of their diagonal)."""
    _compress_with_q_k_v_unreached(method, "uniform")
    for name in ("q_proj", "k_proj", "v_proj"):
        said = (
            f"the output gradients of layer model.layers.1.self_attn.{name} are all zero (the loss does not reach it)"
        )
        assert caplog.text.count(said + ": no output weighting by the loss") == 1, name
    assert caplog.text.count("are all zero") == 3


ATTENTION_1 = "model.layers.1.self_attn."
QKV_1 = ", ".join(ATTENTION_1 + name for name in ("q_proj", "k_proj", "v_proj"))
# global allocation's grouped line (``allocate._APART``), up to the names
NO_GRADIENTS = "usable gradient statistics (the loss does not reach them, or its gradients there are not finite: "


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_layers_the_loss_does_not_reach_are_said_under_global_allocation(method, caplog):
    """Each layer whose loss gradients are all zero is said, and the allocator's grouped line says what they get."""
    _compress_with_q_k_v_unreached(method, "global")
    assert all(f"{name}" in caplog.text for name in QKV_1.split(", ")) and "are all zero" in caplog.text
    assert caplog.text.count(f"3 layers without {NO_GRADIENTS}{QKV_1}), so no output weighting by") == 1


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_unreached_layers_are_said_under_global_allocation_where_none_is_set_apart(method, caplog):
    """b0b77f3 left all-zero gradients to global allocation's grouped line, which comes only where layers of other
    units are set apart: with only such layers targeted (every spectrum in the same units), nothing was said."""
    _compress_with_q_k_v_unreached(method, "global", include=QKV_1.split(", "))
    assert "are all zero" in caplog.text and all(name in caplog.text for name in QKV_1.split(", "))


def test_layers_with_non_finite_gradients_are_not_said_to_be_unreached_under_global_allocation(caplog):
    """A layer whose loss gradients are NaN (the loss reaches it) was grouped as 'the loss does not reach them'."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batches = [example_inputs("llama", s) for s in range(2)]
    config = CompressionConfig(budget=0.5, method="fisher", allocation="global")
    targets, _ = find_targets(model, config)
    stats = collect_statistics(model, targets, batches, progress=False)
    stats[ATTENTION_1 + "q_proj"].out_grad_sq.fill_(math.nan)
    svdlora.compress(model, config, calibration=batches, statistics=stats, progress=False)
    assert f"1 layer without {NO_GRADIENTS}{ATTENTION_1}q_proj), so no output weighting by" in caplog.text


def _compress_with_q_k_v_unreached(method: str, allocation: str, **options) -> None:
    """A tiny Llama whose layer-1 o_proj is zero, so the loss no longer reaches its q/k/v, compressed."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    batches = [example_inputs("llama", s) for s in range(2)]
    svdlora.compress(
        model, budget=0.5, method=method, allocation=allocation, calibration=batches, progress=False, **options
    )


def refit_with_spoilt_attention(monkeypatch, spoil) -> dict[bool, nn.Module]:
    """Tiny Llamas compressed without and with refit (keyed by refit), the refit statistics (G̃, C) of layer 1's
    attention made ``spoil(G̃, C)`` (once per pair: q/k/v still share one); those layers keep their first-pass
    factors."""
    compress_module = sys.modules["svdlora.compress"]  # svdlora.compress is the function
    collect = compress_module.collect_cross_statistics

    def spoilt(*args, **kwargs):
        cross, done = collect(*args, **kwargs), {}
        for name, (gram, product) in cross.items():
            if name.startswith(ATTENTION_1):
                cross[name] = done.setdefault(id(gram), spoil(gram, product))
        return cross

    monkeypatch.setattr(compress_module, "collect_cross_statistics", spoilt)
    batches = [example_inputs("llama", s) for s in range(2)]
    models = {}
    for refit in (False, True):
        torch.manual_seed(0)
        models[refit] = tiny_llama().eval()
        kwargs = {"method": "whiten", "allocation": "uniform", "calibration": batches, "progress": False}
        svdlora.compress(models[refit], budget=0.5, refit=refit, **kwargs)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        first_pass, after = (models[r].get_submodule(ATTENTION_1 + name).dense_weight() for r in (False, True))
        assert torch.equal(first_pass, after), name
    return models


def test_a_zero_refit_gram_is_said_with_its_layers_and_their_first_pass_factors_are_kept(monkeypatch, caplog):
    """The refit's zero Gram G̃ was said as 'the calibration inputs of a layer are all zero: no input whitening',
    though the refit of its layers is skipped and their first-pass factors kept; q/k/v share one G̃."""
    models = refit_with_spoilt_attention(monkeypatch, lambda gram, product: (torch.zeros_like(gram), product))
    kept = ": not refitted (the first-pass factors are kept)"
    assert caplog.text.count(f"the refit's calibration inputs of layers {QKV_1} are all zero{kept}") == 1
    assert caplog.text.count(f"the refit's calibration inputs of layer {ATTENTION_1}o_proj are all zero{kept}") == 1
    assert "no input whitening" not in caplog.text
    refitted = models[True].model.layers[0].self_attn.q_proj.dense_weight()
    assert not torch.equal(models[False].model.layers[0].self_attn.q_proj.dense_weight(), refitted)


def test_a_non_finite_refit_target_is_said_with_its_layers_and_their_first_pass_factors_are_kept(monkeypatch, caplog):
    """A refit target W·C·G̃⁻¹ with NaN/Inf (the dense model's inputs in C: G̃ and the weights are finite) skipped
    the refit of its layers without a word; q/k/v share one C, said once."""
    refit_with_spoilt_attention(monkeypatch, lambda gram, product: (gram, torch.full_like(product, math.nan)))
    kept = "have NaN/Inf: not refitted (the first-pass factors are kept)"
    assert caplog.text.count(f"the refit target values of layers {QKV_1} {kept}") == 1
    assert caplog.text.count(f"the refit target values of layer {ATTENTION_1}o_proj {kept}") == 1
    assert caplog.text.count("refit target values") == 2


def test_a_large_float64_weight_is_whitened_in_float64():
    """Past 2^16 values the weighted route cast the weight to float32 whatever its dtype, where the unweighted
    one keeps float64: a float64 400x300 matrix came back at full rank with error 1.2e-6 (3.6e-15 at 200x300)."""
    torch.manual_seed(0)
    weight, x = torch.randn(400, 300, dtype=torch.float64), torch.randn(1000, 300, dtype=torch.float64)
    weighting = Weighting.from_stats(LayerStats(gram=x.T @ x / 1000, tokens=1000), use_gradients=False)
    ((a, b),) = factorize(weight, [300], weighting)
    assert a.dtype == torch.float64 and relative_error(weight, a @ b) < 1e-12


def test_a_float64_model_is_whitened_with_a_float64_s():
    """The plan kept S in float32 whatever the weights: a float64 model's factors agreed with the float64
    whitening only to ~7e-8 (float32 models keep their float32 S, bit for bit)."""
    torch.manual_seed(0)
    model = tiny_llama().double()
    batches = [{"input_ids": ids} for ids in torch.randint(1, 90, (3, 2, 16)).unbind()]
    config = CompressionConfig(rank=6, method="whiten", allocation="uniform")
    targets, _ = find_targets(model, config)
    stats = collect_statistics(model, targets, batches, gradients=False, progress=False)
    weights = {t.name: weight_out_in(t.module).detach().clone() for t in targets}
    svdlora.compress(model, config, calibration=batches, statistics=stats, progress=False)
    for name, weight in weights.items():
        ((a, b),) = factorize(weight, [6], Weighting.from_stats(stats[name], use_gradients=False))
        expected = a @ b
        assert relative_error(expected, model.get_submodule(name).dense_weight()) < 1e-12, name


def _float64_grams(model, targets, batches) -> dict[str, torch.Tensor]:
    """E[x xᵀ] of each target's inputs, taken in float64 (the model's own dtype)."""
    sums = {}

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            gram, tokens = sums.get(name, (0, 0))
            sums[name] = (gram + x.T @ x, tokens + x.shape[0])

        return hook

    handles = [t.module.register_forward_hook(hook_for(t.name)) for t in targets]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: gram / tokens for name, (gram, tokens) in sums.items()}


def test_a_float64_model_s_statistics_and_factors_are_float64():
    """The Grams (first pass and refit) were sums of products of inputs rounded to float32: a float64 model's Gram
    was ~1e-7 off its float64 value, and its whitened rank-6/16 factors up to 4.7e-6 off the float64 ones."""
    torch.manual_seed(0)
    model = tiny_llama().double().eval()
    batches = [{"input_ids": ids} for ids in torch.randint(1, 90, (3, 2, 16)).unbind()]
    targets, _ = find_targets(model, CompressionConfig(rank=6))
    stats = collect_statistics(model, targets, batches, gradients=False, progress=False)
    modules = {t.name: t.module for t in targets}
    refit_stats = collect_cross_statistics(model, modules, modules, batches, progress=False)  # x̃ = x: G̃ = C = G
    grams = _float64_grams(model, targets, batches)
    for target in targets:
        name, expected = target.name, grams[target.name]
        assert relative_error(expected, stats[name].gram) < 1e-14, name
        assert all(relative_error(expected, gram) < 1e-14 for gram in refit_stats[name]), name
        weight = weight_out_in(target.module).detach()
        for rank in (6, 16):
            ((a, b),) = factorize(weight, [rank], Weighting.from_stats(stats[name], use_gradients=False))
            reference = Weighting.from_stats(LayerStats(gram=expected, tokens=1), use_gradients=False)
            ((a64, b64),) = factorize(weight, [rank], reference)
            assert relative_error(a64 @ b64, a @ b) < 1e-10, (name, rank)


def test_a_float64_model_s_global_allocation_reads_float64_spectra(monkeypatch):
    """Global allocation took a float64 model's weighted spectra in float32: its σ were ~1e-7 off the float64 ones,
    the estimated losses left (Σ dropped σ²) up to 3.7e-7 (no rank changed on this model at budgets 0.1-0.7)."""
    import importlib

    from svdlora.methods import weighted_spectrum

    seen = []

    def recording(weight, weighting):
        spectrum = weighted_spectrum(weight, weighting)
        work = weight.detach() if weighting is None else weighting.whiten(weight.detach())
        seen.append((spectrum, torch.linalg.svdvals(work)))  # float64 throughout
        return spectrum

    monkeypatch.setattr(importlib.import_module("svdlora.compress"), "weighted_spectrum", recording)
    torch.manual_seed(0)
    model = tiny_llama().double().eval()
    batches = [{"input_ids": ids} for ids in torch.randint(1, 90, (3, 2, 16)).unbind()]
    report = svdlora.compress(
        model, budget=0.3, method="kfac", allocation="global", calibration=batches, progress=False
    )
    assert len(seen) >= sum(m.est_loss is not None for m in report.modules) > 0  # each estimate's spectrum
    for spectrum, reference in seen:
        assert spectrum.dtype == torch.float64 and relative_error(reference, spectrum) < 1e-13


def test_a_float64_refit_keeps_float64():
    """The refit target W·C·G̃⁻¹ and its S̃ were rounded to float32 whatever the weight: a float64 layer refitted at
    full rank came back 6e-8 off its float64 target."""
    torch.manual_seed(0)
    weight = torch.randn(24, 32, dtype=torch.float64)
    x = correlated_inputs(500, 32).double()
    x_tilde = x + 0.3 * correlated_inputs(500, 32, seed=1).double()
    gram, cross = x_tilde.T @ x_tilde / 500, x.T @ x_tilde / 500
    right, right_inverse = whitening(gram, 0.01)
    expected = weight @ cross @ right_inverse.T @ right_inverse
    stages = refit_factors(weight, [24], gram, cross, left=None, damping=0.01)
    ((a, b),) = stages
    assert a.dtype == torch.float64 and relative_error(expected, a @ b) < 1e-12


def test_refit_fits_the_dense_output_from_shifted_inputs_better_than_whitening():
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    x = correlated_inputs(500, 32)
    x_tilde = x + 0.3 * correlated_inputs(500, 32, seed=1)  # what a compressed upstream feeds the layer
    gram, cross = (x_tilde.T @ x_tilde).double() / 500, (x.T @ x_tilde).double() / 500
    refit = rebuilt(refit_factors(weight, [8], gram, cross, left=None, damping=1e-6))
    whitened = rebuilt(factorize(weight, [8], Weighting.from_stats(_linear_stats(weight, x_tilde), False)))
    error = lambda w: (x @ weight.T - x_tilde @ w.T).norm().item()  # noqa: E731
    assert error(refit) < 0.95 * error(whitened)


def test_global_allocation_spends_the_budget_and_favours_slow_spectral_decay():
    targets = [Target(name, nn.Linear(64, 64, bias=False), "linear", 64, 64) for name in ("fast", "slow", "flat")]
    k = torch.arange(64, dtype=torch.float64)
    spectra = {"fast": torch.exp(-k / 2), "slow": torch.exp(-k / 20), "flat": torch.full((64,), 0.05)}
    for budget in (0.25, 0.5):
        ranks, dense, _ = allocate_global(targets, spectra, budget, submatrices=2)
        spent = sum(sum(ranks[n]) * 128 for n in ranks) + sum(64 * 64 for _ in dense)
        allowed = budget * 3 * 64 * 64
        assert spent <= allowed and allowed - spent < 128  # within one rank step of the budget
        params = {n: 64 * 64 if n in dense else sum(ranks[n]) * 128 for n in spectra}
        assert params["slow"] > params["fast"] and "fast" not in dense
        assert all(len(r) == min(2, sum(r)) for r in ranks.values())
    ranks, dense, _ = allocate_global(targets, spectra, 0.25, submatrices=1)
    assert not dense and sum(ranks["slow"]) > sum(ranks["fast"])


def test_global_allocation_keeps_a_sensitive_matrix_dense_when_that_is_cheaper():
    targets = [Target("small", nn.Linear(8, 8), "linear", 8, 8), Target("big", nn.Linear(256, 256), "linear", 256, 256)]
    spectra = {"small": torch.full((8,), 100.0, dtype=torch.float64), "big": torch.logspace(0, -6, 256).double()}
    ranks, dense, _ = allocate_global(targets, spectra, 0.3, submatrices=1)
    assert "small" in dense and "small" not in ranks and "big" in ranks


@pytest.mark.parametrize("pivot", [False, True])
def test_global_allocation_keeps_dense_a_matrix_whose_factors_would_not_be_smaller(pivot):
    """A 1x64 gate (Qwen2-MoE's shared_expert_gate is one): rank 1 is exact, so the dense move gained nothing and
    was never offered, and the 65 values of its rank-1 factors (64 pivoted) stayed against 64 dense ones."""
    targets = [Target("gate", nn.Linear(64, 1), "linear", 1, 64), Target("big", nn.Linear(64, 64), "linear", 64, 64)]
    spectra = {"gate": torch.tensor([3.0], dtype=torch.float64), "big": torch.linspace(1, 0.01, 64).double()}
    ranks, dense, _ = allocate_global(targets, spectra, 0.6, submatrices=1, pivot=pivot)
    assert "gate" in dense and "gate" not in ranks and "big" in ranks


def test_global_allocation_spends_what_a_free_dense_move_frees():
    """The free dense move (the 1x3 gate: rank 1 holds 4 values, dense 3) was keyed 0 and so taken last, after the
    moves that did not fit had been dropped: the value it frees went unspent (w stayed at rank 1, loss 5)."""
    targets = [Target("gate", nn.Linear(3, 1), "linear", 1, 3), Target("w", nn.Linear(13, 3), "linear", 3, 13)]
    spectra = {"gate": torch.tensor([1.0], dtype=torch.float64), "w": torch.tensor([3.0, 2.0, 1.0]).double()}
    ranks, dense, _ = allocate_global(targets, spectra, 0.84, submatrices=1)
    assert "as many values as the matrix" in dense["gate"] and ranks == {"w": [2]}


def test_global_allocation_spends_a_budget_that_fits_a_rank_exactly():
    """0.7·1536·7680 = 896·9216 values, which the float product falls short of: the last rank did not fit (895),
    where the uniform allocation gives 896."""
    targets = [Target("w", nn.Linear(7680, 1536, device="meta"), "linear", 1536, 7680)]
    ranks, _, _ = allocate_global(targets, {"w": torch.linspace(1, 0.5, 1536).double()}, 0.7, submatrices=1)
    assert ranks == {"w": [896]}


def _uniform(model, budget: float):
    """The targets of ``model`` (still dense) and the ranks and dense layers uniform allocation gives them."""
    config = CompressionConfig(budget=budget)
    targets, _ = find_targets(model, config)
    uniform, uniform_dense = allocate_ranks(targets, config)
    return targets, uniform, uniform_dense


def _stored(targets, report, names) -> int:
    """The values the layers ``names`` store after ``report``'s compression."""
    lines = {m.name: m for m in report.modules}
    return sum(
        factor_params(t, sum(lines[t.name].ranks)) if lines[t.name].factorized else t.params
        for t in targets
        if t.name in names
    )


def _bare_bert():
    """A tiny bare BertModel: its hidden-state loss never reaches pooler.dense (no gradient statistics)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=96,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


def _switch_transformers():
    """A tiny SwitchTransformers with 8 experts, and one batch: experts no token was routed to never run."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    config = SwitchTransformersConfig(
        vocab_size=96, d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, num_experts=8,
        encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    return SwitchTransformersForConditionalGeneration(config).eval(), [example_inputs("t5", 0)]


def _ran_and_never(model, targets, batches) -> tuple[set[str], set[str]]:
    """The targets that ran on ``batches`` and those that never did (at least two)."""
    ran = set(collect_statistics(model, targets, batches, progress=False))
    never = {t.name for t in targets} - ran
    assert len(never) > 1
    return ran, never


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_a_layer_the_loss_does_not_reach_gets_its_uniform_share_under_global_allocation(budget, caplog):
    model = _bare_bert()
    targets, uniform, _ = _uniform(model, budget)
    report = svdlora.compress(
        model, budget=budget, calibration=[example_inputs("bert", s) for s in range(2)], progress=False
    )
    assert report.allocation == "global"
    ranks = {m.name: m.ranks for m in report.factorized}
    assert "pooler.dense" in ranks and ranks["pooler.dense"] == uniform["pooler.dense"]
    encoder = {n: sum(r) for n, r in ranks.items() if n.startswith("encoder.")}
    assert len(set(encoder.values())) > 1  # still allocated globally
    names = {t.name for t in targets}
    assert _stored(targets, report, names) <= budget * sum(t.params for t in targets)
    assert f"1 layer without {NO_GRADIENTS}pooler.dense)" in caplog.text


@pytest.mark.parametrize(
    ("method", "gradients"), [("fisher", True), ("kfac", True), ("whiten", False), ("fisher", False)]
)
def test_a_layer_the_loss_does_not_reach_is_said_once_under_uniform_allocation(method, gradients, caplog):
    """Under uniform allocation a bare BertModel's pooler.dense, which its loss never reaches, got no output
    weighting from fisher/kfac without a word (global allocation says it). Not said where no gradients were
    collected (method whiten; statistics given without them): nothing tells there which layers the loss reaches."""
    model = _bare_bert()
    batches = [example_inputs("bert", s) for s in range(2)]
    targets, _ = find_targets(model, CompressionConfig(budget=0.5))
    stats = None if gradients else collect_statistics(model, targets, batches, gradients=False, progress=False)
    kwargs = {"method": method, "allocation": "uniform", "statistics": stats, "progress": False}
    svdlora.compress(model, budget=0.5, calibration=batches, **kwargs)
    said = "the loss never reaches layer pooler.dense (no output gradients): no output weighting by the loss"
    assert caplog.text.count(said) == (method != "whiten" and gradients)
    assert caplog.text.count("never reaches") == caplog.text.count(said)


def test_layers_that_never_ran_get_their_uniform_share_and_do_not_starve_the_others(caplog):
    model, batches = _switch_transformers()
    budget = 0.3
    targets, uniform, uniform_dense = _uniform(model, budget)
    ran, never = _ran_and_never(model, targets, batches)
    report = svdlora.compress(model, budget=budget, calibration=batches, progress=False)
    ranks = {m.name: m.ranks for m in report.factorized}
    assert {n: ranks.get(n) for n in never} == {n: uniform.get(n) for n in never}
    assert not never & set(uniform_dense)
    # the layers that ran share what uniform left them (before: rank 1 or 2 each, beside 18 experts kept dense)
    assert _stored(targets, report, ran) >= 0.9 * sum(
        factor_params(t, sum(uniform[t.name])) for t in targets if t.name in ran
    )
    assert _stored(targets, report, ran | never) <= budget * sum(t.params for t in targets)
    assert f"{len(never)} layers that never ran on the calibration data (" in caplog.text


def _byte_plans(model, budget: float, stage_dtypes: list[str]):
    """The targets of ``model`` (still dense), and the stage plans and dense layers uniform byte allocation
    gives them with ``stage_dtypes`` over 2 submatrices."""
    targets, _ = find_targets(model, CompressionConfig(budget=budget))
    formats = stage_formats(stage_dtypes, 2, torch.float32)
    plans, dense = allocate_bytes(targets, budget, formats, torch.float32)
    return targets, plans, dense


def _stored_bytes(targets, report, names) -> int:
    """The bytes the layers ``names`` store after ``report``'s compression with stage dtypes."""
    lines = {m.name: m for m in report.modules}
    return sum(
        lines[t.name].stored_bytes if lines[t.name].factorized else target_bytes(t, torch.float32)
        for t in targets
        if t.name in names
    )


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_a_layer_the_loss_does_not_reach_gets_its_uniform_byte_share_with_stage_dtypes(method, caplog):
    """As in parameters, under the byte budget: pooler.dense's σ(W·S) ranked with the loss-weighted
    spectra took more than its uniform share (before: ranks [15, 15] where uniform gives [9, 9])."""
    model, budget, stage_dtypes = _bare_bert(), 0.3, ["int8", "int8"]
    targets, uniform, _ = _byte_plans(model, budget, stage_dtypes)
    report = svdlora.compress(
        model, budget=budget, submatrices=2, stage_dtypes=stage_dtypes, method=method, allocation="global",
        calibration=[example_inputs("bert", s) for s in range(2)], progress=False,
    )  # fmt: skip
    ranks = {m.name: m.ranks for m in report.factorized}
    assert ranks["pooler.dense"] == uniform["pooler.dense"][0]
    encoder = {n: sum(r) for n, r in ranks.items() if n.startswith("encoder.")}
    assert len(set(encoder.values())) > 1  # still allocated globally
    names = {t.name for t in targets}
    assert _stored_bytes(targets, report, names) <= budget * sum(target_bytes(t, torch.float32) for t in targets)
    assert caplog.text.count(f"1 layer without {NO_GRADIENTS}pooler.dense)") == 1


@pytest.mark.parametrize("stage_dtypes", [["int8", "int8"], ["full-int8", "int4g32"]])
def test_layers_that_never_ran_get_their_uniform_byte_share_with_stage_dtypes(stage_dtypes, caplog):
    """Experts that never ran (σ(W)) took every rank under the byte budget (before, int8 at 0.2: rank 32 each
    where uniform gives 16, and the layers that ran stored 0.70 of their uniform bytes)."""
    model, batches = _switch_transformers()
    budget = {"int8": 0.2, "full-int8": 0.4}[stage_dtypes[0]]
    targets, uniform, uniform_dense = _byte_plans(model, budget, stage_dtypes)
    ran, never = _ran_and_never(model, targets, batches)
    report = svdlora.compress(
        model, budget=budget, submatrices=2, stage_dtypes=stage_dtypes, method="kfac", allocation="global",
        calibration=batches, progress=False,
    )  # fmt: skip
    lines = {m.name: m for m in report.modules}
    assert {n: lines[n].ranks for n in never} == {n: uniform[n][0] for n in never}
    assert not never & set(uniform_dense)
    uniform_ran = sum(layer_bytes(*uniform[t.name], t.out_features, t.in_features) for t in targets if t.name in ran)
    assert _stored_bytes(targets, report, ran) >= 0.9 * uniform_ran  # what uniform left them, spent globally
    total = sum(target_bytes(t, torch.float32) for t in targets)
    assert _stored_bytes(targets, report, ran | never) <= budget * total
    assert caplog.text.count(f"{len(never)} layers that never ran on the calibration data (") == 1


def test_calibrated_global_model_saves_and_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()  # grouped-query attention: k/v smaller than q
    batches = [example_inputs("llama", s) | {"labels": example_inputs("llama", s)["input_ids"]} for s in range(4)]
    report = svdlora.compress(model, budget=0.6, submatrices=2, calibration=batches, refit=True, progress=False)
    assert report.method == "kfac" and report.allocation == "global" and report.calibration["refit"]
    ranks = {sum(m.ranks) for m in report.factorized}
    assert len(ranks) > 1  # not a uniform share
    expected = output_of(model, "llama")
    svdlora.save_compressed(model, tmp_path / "out")
    loaded = svdlora.load_compressed(tmp_path / "out", device="cpu")
    torch.testing.assert_close(output_of(loaded, "llama"), expected, rtol=1e-5, atol=1e-5)
    assert loaded.svdlora_report.allocation == "global"


def test_calibration_beats_plain_svd_on_a_model_output():
    torch.manual_seed(0)
    dense = tiny_gpt2().eval()
    batches = [{"input_ids": example_inputs("gpt2", s)["input_ids"]} for s in range(6)]
    batches = [b | {"labels": b["input_ids"]} for b in batches]
    reference = output_of(dense, "gpt2")
    errors = {}
    for method in ("svd", "whiten"):
        model = copy.deepcopy(dense)
        calibration = None if method == "svd" else batches
        svdlora.compress(
            model, budget=0.4, method=method, allocation="uniform", calibration=calibration, progress=False
        )
        errors[method] = (output_of(model, "gpt2") - reference).norm().item()
    assert errors["whiten"] < errors["svd"]


def test_healing_rate_warms_up_then_decays_to_its_floor_by_either_limit():
    rates = [learning_rate(1e-3, step, 100, 0.0, None) for step in range(100)]
    assert rates[0] < rates[5] < rates[WARMUP_STEPS - 1] == pytest.approx(1e-3, rel=0.03)
    tail = rates[WARMUP_STEPS:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))  # decays monotonically
    assert rates[-1] == pytest.approx(1e-3 * FINAL_LR_FRACTION, rel=0.01)
    # a time limit ends the run first: the rate follows the clock, not the step count
    assert learning_rate(1e-3, 20, 100_000, 60.0, 60.0) == pytest.approx(1e-3 * FINAL_LR_FRACTION)


@pytest.mark.parametrize("steps", [1, 3, 9, 25])
def test_a_short_healing_run_reaches_its_peak_rate(steps):
    # found by review: the warm-up was 10 steps whatever the run, so --heal-steps 3 peaked at 0.155 x --heal-lr
    rates = [learning_rate(1e-3, step, steps, 0.0, None) for step in range(steps)]
    assert max(rates) == pytest.approx(1e-3, rel=0.03)
    peak = rates.index(max(rates))
    assert peak <= steps // 10 and all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :], strict=False))
    # a run of 100 steps or more (or one the time limit ends) still warms up over WARMUP_STEPS
    assert learning_rate(1e-3, 0, 100_000, 0.0, 60.0) == pytest.approx(1e-3 / WARMUP_STEPS)


def test_a_time_limit_without_steps_is_refused():
    """--heal-seconds alone compressed without healing, and said nothing."""
    with pytest.raises(SvdloraError, match="pass --heal-steps N as well"):
        CompressionConfig(heal_seconds=60)
    CompressionConfig(heal_steps=10, heal_seconds=60)


def _compressed_gpt2(batch_count: int):
    """(the dense tiny GPT-2, a copy compressed at budget 0.3, ``batch_count`` batches of its inputs)."""
    torch.manual_seed(0)
    dense = tiny_gpt2().eval()
    batches = [{"input_ids": example_inputs("gpt2", s)["input_ids"]} for s in range(batch_count)]
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.3, progress=False)
    return dense, model, batches


def test_healing_lowers_the_calibration_loss():
    dense, model, batches = _compressed_gpt2(4)
    result = heal(model, batches, steps=40, teacher=dense, loss="distill", lr=3e-3, progress=False)
    assert result.steps == 40 and result.last_loss < 0.7 * result.first_loss
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("options, message", [
    ({"loss": "distil"}, "heal_loss must be one of \\('distill', 'lm'\\), got 'distil'"),
    ({"lr": 0}, "heal_lr must be a finite number > 0, got 0"),
    ({"steps": 2.5}, "heal_steps must be an integer >= 1, got 2.5"),  # ran 3 steps
])  # fmt: skip
def test_heal_refuses_a_loss_it_does_not_know_and_a_rate_that_trains_nothing(options, message):
    """Found by review: heal() itself did not check what CompressionConfig checks, so a misspelt loss with
    labelled batches trained the labels' loss ('lm') under the misspelt name, and lr=0 ran every step unchanged."""
    dense, model, [batch] = _compressed_gpt2(1)
    batch["labels"] = batch["input_ids"]  # labelled: a misspelt loss trained them as 'lm'
    with pytest.raises(SvdloraError, match=message):
        heal(model, [batch], teacher=dense, progress=False, **({"steps": 2} | options))


def _compressed_half_llama(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, list[nn.Parameter]]:
    """(the dense tiny Llama in ``dtype``, a copy compressed at budget 0.5, the copy's factors)."""
    torch.manual_seed(0)
    dense = tiny_llama().to(dtype).eval()
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, progress=False)
    return dense, model, [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.A, m.B)]


@pytest.mark.parametrize("dtype, changed", [(torch.float16, 0.9), (torch.bfloat16, 0.5)])
def test_healing_a_half_precision_model_trains_through_float32_masters(dtype, changed):
    """Found by review: Adam on float16 factors divided 0 by 0 at its first step (its second moment underflows,
    its eps rounds to 0), so healing a float16 model always 'diverged at step 1 (loss nan): lower --heal-lr',
    whatever the rate; on bfloat16 factors 10 steps at 1e-4 changed a third of their values, the rest rounded away."""
    dense, model, factors = _compressed_half_llama(dtype)
    batches = [{"input_ids": torch.randint(1, 96, (2, 12))} for _ in range(3)]
    before = [p.detach().clone() for p in factors]
    heal(model, batches, steps=10, teacher=dense, progress=False)
    moved = sum(int((p != b).sum()) for p, b in zip(factors, before, strict=True)) / sum(p.numel() for p in factors)
    assert moved > changed and all(p.dtype == dtype for p in factors)


def test_healing_through_float32_masters_holds_one_gradient_at_a_time(monkeypatch):
    """Found by review: the half-precision gradient stayed beside its float32 copy through Adam's step, and the
    masters kept theirs after it (a float32 gradient, twice the factors' size, held between steps)."""
    dense, model, factors = _compressed_half_llama(torch.float16)
    optimizers, step = [], torch.optim.Adam.step

    def watched(self, *args, **kwargs):  # during the step: the half gradients already dropped
        optimizers.append(self)
        assert all(p.grad is None for p in factors), "a half-precision gradient is held beside its master's"
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", watched)
    heal(model, [{"input_ids": torch.randint(1, 96, (2, 12))}], steps=2, teacher=dense, progress=False)
    masters = [p for group in optimizers[-1].param_groups for p in group["params"]]
    assert len(optimizers) == 2 and all(m.dtype == torch.float32 and m.grad is None for m in masters)


def test_healing_reports_the_healed_models_loss_on_the_batches_of_its_first_steps():
    """Found by review: the report's 'loss A -> B' compared the first steps' losses with the last steps' own,
    of other batches and one update before the end: on SmolLM2 (4 batches, 3 steps at 1e-5) it said
    '0.0198 -> 0.0162' where the batches' mean KL had gone from 0.018 to 0.148. B is now the healed model's
    loss on the batches of the first steps (cycled: 3 steps over 2 batches), A their losses as trained on.
    (Earlier, in a run of up to 8 steps, the two means were of the same steps and always equal.)"""
    dense, model, batches = _compressed_gpt2(2)
    result = heal(model, batches, steps=3, teacher=dense, loss="distill", lr=3e-2, progress=False)
    with torch.no_grad():
        after = [heal_module._loss(model.eval(), dense, b, "distill", False).item() for b in batches]
    assert result.last_loss == pytest.approx((2 * after[0] + after[1]) / 3, rel=1e-5)
    assert result.first_loss != result.last_loss


def test_healing_that_raised_the_loss_on_its_batches_says_so(caplog):
    """Found by review: on SmolLM2 3 steps at the default rate took the first batch's KL from 0.0198 to 2.65 and
    compress kept the healed model without a word; the rate here is too high for the tiny GPT-2."""
    dense, model, batches = _compressed_gpt2(1)
    with caplog.at_level("WARNING", logger="svdlora.heal"):
        result = heal(model, batches, steps=1, teacher=dense, lr=3e-2, progress=False)
    assert result.last_loss > result.first_loss
    assert "healing raised the loss on its first batches" in caplog.text and "lower --heal-lr" in caplog.text


def test_a_sequence_classifier_heals_on_its_class_labels():
    """Found by review: healing with loss 'lm' took the labels as a causal LM's tokens (labels[:, 1:]), so a
    classifier calibrated on its class labels passed every check, was compressed, then stopped at healing's
    first step: IndexError 'too many indices for tensor of dimension 1'."""
    torch.manual_seed(0)
    ids = torch.randint(1, 90, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    report = svdlora.compress(
        tiny_bert().eval(), budget=0.5, calibration=[batch], heal_steps=2, heal_loss="lm", progress=False
    )
    assert report.heal["steps"] == 2 and math.isfinite(report.heal["last_loss"])


def test_the_calibration_loss_is_the_models_own_token_loss_summed():
    """Found by review: every model with per-token logits but an encoder-decoder was scored as a causal LM (token
    t against label t + 1), so a token classifier's (or masked LM's) Fisher statistics paired each position with
    its neighbour's tag."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    tagger = BertForTokenClassification(BertConfig(**{**tiny_bert().config.to_dict(), "num_labels": 3})).eval()
    ids = torch.randint(1, 90, (2, 8))
    for model, labels, positions in ((tagger, torch.randint(0, 3, (2, 8)), 16), (tiny_gpt2().eval(), ids, 14)):
        batch = {"input_ids": ids, "labels": labels}
        outputs = model(**batch)
        loss = calibration.calibration_loss(outputs, batch, torch.Generator(), padding.is_causal_lm(model))
        assert loss.item() == pytest.approx(outputs.loss.item() * positions, rel=1e-5)


@pytest.mark.parametrize("heal_loss", [None, "distill", "lm"])
def test_a_sequence_classifier_given_token_labels_is_refused_at_its_first_batch(heal_loss):
    """Found by review: labels one per token given to a sequence classifier stopped the calibration statistics
    (or healing's check of its batches) with the model's raw ValueError "Expected input batch_size (2) to match
    target batch_size (24)"."""
    torch.manual_seed(0)
    ids = torch.randint(1, 90, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    heal = {"heal_steps": 2, "heal_loss": heal_loss} if heal_loss else {}
    with pytest.raises(SvdloraError, match="BertForSequenceClassification refused the batches' labels .*one per row"):
        svdlora.compress(tiny_bert().eval(), budget=0.5, calibration=[batch], progress=False, **heal)


@pytest.mark.parametrize("steps", [5, 1])
def test_a_diverged_healing_leaves_the_factors_as_before_healing(steps):
    """Review: heal() called directly raised on a non-finite loss but left the factors of the update that
    diverged (compress restores the dense model; heal alone did not). Found by review: each step checked the
    loss of the update before it, so the last update went unchecked: one step at lr=1e30 returned a model whose
    every output was nan, with last_loss nan and no warning (nan > A is false), and compress kept it."""
    dense, model, batches = _compressed_gpt2(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SvdloraError, match="healing diverged at step 1"):
        heal(model, batches, steps=steps, teacher=dense, lr=1e30, progress=False)
    assert [n for n, p in model.named_parameters() if not torch.equal(p, before[n])] == []


def test_compress_heals_without_the_host_copy_it_does_not_need(monkeypatch):
    """heal() keeps a CPU copy of the factors to put back on divergence (the size of the factors: ~14 GB
    for a 7B model's at 0.5); compress restores the dense layers itself, so it asks heal for no copy."""
    compress_module = sys.modules["svdlora.compress"]  # svdlora.compress is the function
    seen = []
    real = compress_module.heal
    monkeypatch.setattr(compress_module, "heal", lambda *a, **k: seen.append(k) or real(*a, **k))
    torch.manual_seed(0)
    batches = [{"input_ids": example_inputs("gpt2", s)["input_ids"]} for s in range(2)]
    svdlora.compress(tiny_gpt2().eval(), budget=0.3, calibration=batches, heal_steps=1, progress=False)
    assert [k.get("restore_on_divergence") for k in seen] == [False]


def test_healing_trains_only_the_factors():
    dense, model, batches = _compressed_gpt2(1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".A", ".B"))}
    heal(model, batches, steps=3, teacher=dense, progress=False)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_a_teacher_in_training_mode_gives_a_target_without_dropout():
    """Found by review: heal put the student in eval mode but ran the teacher as it came, and compress's
    teacher is a copy of the model as given: one in training mode drew dropout into every target (GPT-2's
    0.1), so even the dense model distilled into itself had a loss. The teacher's mode is restored after."""
    torch.manual_seed(0)
    teacher = tiny_gpt2().train()
    student = copy.deepcopy(teacher).eval()
    batches = [{"input_ids": example_inputs("gpt2", 0)["input_ids"]}]
    parameters = list(student.parameters())
    result = heal(student, batches, steps=1, teacher=teacher, parameters=parameters, progress=False)
    assert result.first_loss == 0.0  # step 0 reads the loss before any update: the same model, no dropout
    assert teacher.training and all(m.training for m in teacher.modules())


@pytest.mark.parametrize("run", ["statistics", "refit statistics", "heal check", "heal"])
def test_each_pass_in_eval_mode_gives_every_module_back_its_own_mode(run):
    """Found by review: the passes undid their eval() with model.train(was_training), which sets every submodule
    to the model's mode: a block the caller had put in eval mode in a model being trained came back training."""
    dense, model, batches = _compressed_gpt2(1)
    for m in (dense, model):
        m.train().transformer.h[0].eval()  # one block frozen, the rest training
    modes = [(n, m.training) for part in (dense, model) for n, m in part.named_modules()]
    if run == "statistics":
        collect_statistics(dense, find_targets(dense, CompressionConfig())[0], batches, progress=False)
    elif run == "refit statistics":
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        collect_cross_statistics(model, {n: dense.get_submodule(n) for n in layers}, layers, batches, progress=False)
    elif run == "heal check":
        heal_module.check_heal_outputs(model, batches[0], "distill")
    else:
        heal(model, batches, steps=1, teacher=dense, progress=False)
    assert [(n, m.training) for part in (dense, model) for n, m in part.named_modules()] == modes


@pytest.mark.parametrize("loss", ["distill", "lm"])
def test_healing_asks_whether_the_model_is_an_encoder_decoder_once_a_run(monkeypatch, loss):
    # found by review: each step asked the model's config 3 times (once more per row of a left-padded batch)
    torch.manual_seed(0)
    dense = tiny_gpt2().eval()
    ids = example_inputs("gpt2", 0)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded: runs row by row
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": ids}]
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.3, progress=False)
    asked = []
    real = heal_module.is_encoder_decoder
    monkeypatch.setattr(heal_module, "is_encoder_decoder", lambda m: asked.append(m) or real(m))
    heal(model, batches, steps=3, teacher=dense, loss=loss, progress=False)
    assert len(asked) == 1


def test_self_generated_calibration_is_deterministic_and_full_length():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    first = generate_text(model, None, samples=3, length=20, seed=1, progress=False)
    again = generate_text(model, None, samples=3, length=20, seed=1, progress=False)
    assert len(first) == 3 and all(b["input_ids"].shape == (1, 20) for b in first)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))


def test_self_generated_calibration_shows_its_progress_token_by_token(monkeypatch):
    from svdlora import calibration_data

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(calibration_data, "tqdm", Bar)
    generate_text(tiny_gpt2().eval(), None, samples=18, length=12, seed=1, progress=True)  # batches of 16 and 2
    assert len(bars) == 1 and bars[0].total == bars[0].n == 18 * 11 and bars[0].closed


def test_statistics_are_collected_once_per_shared_input():
    model = tiny_llama().eval()
    targets, _ = find_targets(model, CompressionConfig())
    stats = collect_statistics(model, targets, [example_inputs("llama")], progress=False)
    q, k = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert q.gram is k.gram  # q/k/v see one tensor: one Gram, one whitening
    assert all(torch.isfinite(s.gram).all() and s.has_gradients for s in stats.values())


def tiny_shared_key_deberta() -> nn.Module:
    """DeBERTa-v2/v3 as released (share_att_key): query_proj and key_proj also project the relative position
    embeddings, one tensor for every block; value_proj does not."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    return DebertaV2Model(
        DebertaV2Config(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            relative_attention=True, position_buckets=8, share_att_key=True, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", position_biased_input=False,
        )
    ).eval()  # fmt: skip


def grams_of_every_call(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict]) -> dict:
    """{layer: (Σ x xᵀ / tokens, tokens)} over every call of each of ``modules``, in float64."""
    sums = {name: [0, 0] for name in modules}

    def hook(module, inputs, output, name):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        sums[name][0] += x.T @ x
        sums[name][1] += x.shape[0]

    handles = [m.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)) for name, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: (total / tokens, tokens) for name, (total, tokens) in sums.items()}


def test_a_layer_called_again_on_another_input_keeps_each_layers_gram_its_own():
    """Found by review: a layer's Gram was kept under the first layer that read its first input (q/k/v share
    one), so a tensor only one of them read went into both: in DeBERTa-v2/v3 value_proj's Gram held the
    position embeddings (31% off), and the query/key Grams of the blocks after the first missed them (35% off)."""
    model = tiny_shared_key_deberta()
    targets, _ = find_targets(model, CompressionConfig())
    batches = [{"input_ids": torch.randint(0, 96, (2, 8))} for _ in range(2)]
    stats = collect_statistics(model, targets, batches, gradients=False, progress=False)
    for name, (gram, tokens) in grams_of_every_call(model, {t.name: t.module for t in targets}, batches).items():
        torch.testing.assert_close(stats[name].gram, gram, rtol=1e-5, atol=1e-7, msg=name)
        assert stats[name].tokens == tokens, name
    q, k, v = (stats[f"encoder.layer.1.attention.self.{p}_proj"] for p in ("query", "key", "value"))
    assert q.gram is k.gram and v.gram is not q.gram  # one Gram per distinct set of inputs


def test_the_refit_statistics_hold_every_call_of_a_layer_and_only_its_own():
    """Found by review: the refit kept one input per layer, the last call's, under the layer that read it
    first, so DeBERTa-v2/v3's query_proj and key_proj were refitted to the position embeddings alone (41% off)
    and value_proj, which never reads them, to them too (87% off). With compressed layers equal to the
    dense ones, G̃ and C are each layer's Gram over all its calls."""
    model = tiny_shared_key_deberta()
    targets, _ = find_targets(model, CompressionConfig())
    dense = {t.name: t.module for t in targets}
    compressed = {name: copy.deepcopy(m) for name, m in dense.items()}
    for name, m in compressed.items():
        model.set_submodule(name, m)
    batches = [{"input_ids": torch.randint(0, 96, (2, 8))} for _ in range(2)]
    cross = collect_cross_statistics(model, dense, compressed, batches, progress=False)
    for name, (gram, _) in grams_of_every_call(model, compressed, batches).items():
        torch.testing.assert_close(cross[name][0], gram, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(cross[name][1], gram, rtol=1e-5, atol=1e-7, msg=name)
    q, k, v = (cross[f"encoder.layer.1.attention.self.{p}_proj"] for p in ("query", "key", "value"))
    assert q is k and v is not q  # layers that read the same tensors share one (G̃, C): one root each


def test_method_that_needs_data_is_refused_without_it():
    with pytest.raises(SvdloraError, match="needs calibration data"):
        svdlora.compress(tiny_gpt2(), budget=0.5, method="whiten", progress=False)
    with pytest.raises(SvdloraError, match=r"refit pass \(--refit\) needs calibration data"):
        svdlora.compress(tiny_gpt2(), budget=0.5, refit=True, progress=False)  # was silently skipped


# CLI: bad calibration input is one line and exit 2, before the model is loaded


@pytest.fixture
def gpt2_with_tokenizer(tmp_path):
    model, tok = word_gpt2(WORDS)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(word_text(WORDS))
    return tmp_path


def _one_line_error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "data, message",
    [("missing.txt", "does not exist"), ("empty.txt", "empty file"), ("emptydir", "empty folder")],
)
def test_bad_calibration_path_is_one_line_before_loading(gpt2_with_tokenizer, capsys, monkeypatch, data, message):
    root = gpt2_with_tokenizer
    (root / "empty.txt").write_text("")
    (root / "emptydir").mkdir()
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    line = _one_line_error(capsys, "compress", root / "dense", "-o", root / "out", "--calibration", root / data)
    assert message in line and not (root / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--refit-samples", "8"], "--refit-samples has no effect without --refit"),
        (["--heal-loss", "lm"], "--heal-loss has no effect without --heal-steps N"),
        (["--heal-lr", "1e-3", "--heal-steps", "0"], "--heal-lr has no effect without --heal-steps N"),
        (["--eval-limit", "2"], "--eval-limit has no effect without --eval DATA"),
        (["--refit", "--stage-dtypes", "int8", "--submatrices", "2"], "--refit has no effect with --stage-dtypes"),
    ],
)
def test_a_flag_without_the_one_it_shapes_is_refused(gpt2_with_tokenizer, capsys, monkeypatch, flags, message):
    """Each of these compressed without a word, the flag ignored (--refit: compress skips it with stage dtypes)."""
    root = gpt2_with_tokenizer
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    line = _one_line_error(capsys, "compress", root / "dense", "-o", root / "out", *flags)
    assert message in line and not (root / "out").exists()


def test_calibration_of_the_wrong_kind_is_one_line(gpt2_with_tokenizer, capsys):
    root = gpt2_with_tokenizer
    (root / "images" / "cat").mkdir(parents=True)
    (root / "images" / "cat" / "x.png").write_bytes(b"not an image")
    line = _one_line_error(
        capsys, "compress", root / "dense", "-o", root / "out", "--calibration", root / "images", "--no-progress"
    )
    assert "folder" in line and not (root / "out").exists()


def test_calibration_text_without_a_tokenizer_is_one_line(gpt2_with_tokenizer, tmp_path, capsys):
    """BERT's empty transformers-5 tokenizer read every word as [UNK] and calibrated on that."""
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "bert")
    capsys.readouterr()  # save_pretrained's progress bar
    text = gpt2_with_tokenizer / "text.txt"
    args = ["compress", tmp_path / "bert", "-o", tmp_path / "out", "--calibration", text, "--no-progress"]
    line = _one_line_error(capsys, *args)
    assert "no tokenizer files" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_calibration_text_without_a_tokenizer_is_refused_before_loading(
    gpt2_with_tokenizer, tmp_path, capsys, monkeypatch, stream
):
    """A local folder without tokenizer files was refused only once the whole model was loaded (minutes for
    a 7B model): the folder says so before, in memory and streamed alike."""
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    monkeypatch.setattr("svdlora.cli.compress_run.compress_checkpoint", _never_called)
    args = ["compress", tmp_path / "llama", "-o", tmp_path / "out", "--calibration", gpt2_with_tokenizer / "text.txt"]
    line = _one_line_error(capsys, *args, *stream)
    assert "cannot load the tokenizer" in line and not (tmp_path / "out").exists()


def test_a_folder_whose_config_names_no_architecture_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    """A config.json without "architectures" loads as AutoModel: the check before the load built its meta
    model as AutoModel(config), which raises (compress then stopped with 'free space or fix permissions')."""
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "bare")  # no tokenizer files
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("some text to calibrate on")
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    args = ["compress", tmp_path / "bare", "-o", tmp_path / "out", "--calibration", tmp_path / "text.txt"]
    assert "cannot load the tokenizer" in _one_line_error(capsys, *args)


def test_a_folder_with_its_own_code_is_checked_before_loading_with_trust_remote_code(tmp_path, capsys, monkeypatch):
    """The check before the load read config.json without --trust-remote-code: transformers asked on the
    terminal whether to run the folder's code (15 s), and without a terminal the check was skipped."""
    folder = tmp_path / "custom"
    tiny_llama().save_pretrained(folder)  # no tokenizer files
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tinycustom'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyForCausalLM"])
    classes = {"AutoModel": "modeling_tiny.TinyForCausalLM", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig", **classes}
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("some text to calibrate on")
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    args = ["compress", folder, "-o", tmp_path / "out", "--calibration", tmp_path / "text.txt", "--trust-remote-code"]
    assert "cannot load the tokenizer" in _one_line_error(capsys, *args)


def test_a_meta_build_that_fails_leaves_the_model_to_its_load(gpt2_with_tokenizer, capsys, monkeypatch):
    """The check before the load is only early: a model whose meta build fails (models that need real
    tensors in __init__) is judged by its real load, which here succeeds."""

    def fails(*args, **kwargs):
        raise RuntimeError("needs real tensors")

    monkeypatch.setattr("svdlora.models.build_model", fails)
    root = gpt2_with_tokenizer
    args = ["compress", root / "dense", "-o", root / "out", "--calibration", root / "text.txt", "--no-progress"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err


def test_self_calibration_needs_no_tokenizer(tmp_path, capsys):
    """A Llama folder saved without its tokenizer was refused ('cannot load the tokenizer'), though the
    model writes its own calibration text from token ids."""
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    args = ["compress", tmp_path / "llama", "-o", tmp_path / "out", "--calibration-samples", "2", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    assert "self: text sampled from the model" in capsys.readouterr().out


def test_cli_calibrates_and_info_shows_the_ranks_and_why(gpt2_with_tokenizer, capsys):
    root = gpt2_with_tokenizer
    args = ["compress", root / "dense", "-o", root / "out", "--budget", "0.5", "--calibration", root / "text.txt"]
    assert (
        main([str(a) for a in [*args, "--calibration-samples", "4", "--calibration-length", "32", "--no-progress"]])
        == 0
    )
    out = capsys.readouterr().out
    assert "kfac / global" in out and "text.txt" in out
    assert main(["info", str(root / "out")]) == 0
    info = capsys.readouterr().out
    assert "global" in info and "ranks" in info


def _never_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the calibration input was checked")


def _linear_stats(weight: torch.Tensor, x: torch.Tensor):
    """LayerStats of one Linear layer fed ``x``, through the real collector."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = nn.Sequential(layer)
    targets = [Target("0", layer, "linear", *weight.shape)]

    stats = collect_statistics(model, targets, [{"input": x}], gradients=True, progress=False)
    assert math.isfinite(stats["0"].gram.sum().item())
    return stats["0"]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "vit", "marian", "t5"])
def test_every_model_kind_calibrates(kind):
    from .conftest import TINY_MODELS

    torch.manual_seed(0)
    dense = TINY_MODELS[kind]().eval()
    batches = [example_inputs(kind, s) for s in range(3)]
    if kind in ("gpt2", "llama", "marian", "t5"):  # text with targets: the token loss
        target = "decoder_input_ids" if kind in ("marian", "t5") else "input_ids"
        batches = [b | {"labels": b[target].contiguous()} for b in batches]
    reference = output_of(dense, kind)
    plain, calibrated = copy.deepcopy(dense), copy.deepcopy(dense)
    svdlora.compress(plain, budget=0.5, progress=False, calibration=None)
    report = svdlora.compress(calibrated, budget=0.5, progress=False, calibration=batches)
    assert report.method == "kfac" and report.calibration["gradients"]
    out = output_of(calibrated, kind)
    assert torch.isfinite(out).all()
    assert (out - reference).norm() < (output_of(plain, kind) - reference).norm()


def test_a_device_solver_that_fails_is_redone_on_the_cpu(caplog):
    """cuSOLVER does not always converge: the whitening's eigh (and the spectra's svdvals) are redone
    on the CPU and come back on the matrix's device. A stand-in matrix "on" the meta device plays the GPU."""
    from svdlora.methods.weighting import on_cpu_if_it_fails

    real = torch.randn(6, 6, dtype=torch.float64)
    real = real @ real.T

    class OnDevice:
        device = torch.device("meta")

        def cpu(self):
            return real

    def eigh(matrix):
        if matrix is not real:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return torch.linalg.eigh(matrix)

    with caplog.at_level("WARNING"):
        values, vectors = on_cpu_if_it_fails(eigh, OnDevice())
    assert values.device.type == vectors.device.type == "meta" and vectors.shape == (6, 6)
    assert "redone on the CPU" in caplog.text
    with pytest.raises(torch.linalg.LinAlgError):  # on the CPU itself a failure is not hidden
        on_cpu_if_it_fails(lambda m: eigh(m.T.clone()), real)


def test_self_calibration_of_an_image_model_is_refused_in_plain_words():
    from .conftest import TINY_MODELS

    with pytest.raises(svdlora.SvdloraError, match="needs a causal language model; this is an image model"):
        svdlora.compress(TINY_MODELS["vit"]().eval(), budget=0.5, calibration="self", progress=False)


def test_text_calibration_of_an_audio_model_is_refused_in_one_line(tmp_path, capsys):
    """Whisper (audio input_features) was calibrated as a seq2seq translator: its own greedy translations of the
    text's sentences were generated from input_ids, and compress ended as 'internal error ValueError: Make sure to
    provide either `input_features` or `encoder_outputs` to `generate`' (exit 1), in Python a ValueError."""
    from .eval_helpers import tiny_whisper, word_tokenizer

    tok = word_tokenizer(["a", "cat", "sat"], eos_suffix=True)
    (tmp_path / "src.txt").write_text("a cat sat\na cat\n")
    refusal = "--calibration reads text, sentences or images, and this is an audio model"
    with pytest.raises(SvdloraError, match=refusal):
        svdlora.compress(tiny_whisper(len(tok)), budget=0.5, calibration=tmp_path / "src.txt", processor=tok)
    tiny_whisper(len(tok)).save_pretrained(tmp_path / "whisper")
    tok.save_pretrained(tmp_path / "whisper")
    args = ["compress", str(tmp_path / "whisper"), "--calibration", str(tmp_path / "src.txt")]
    assert main([*args, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert refusal in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["seq2seq", "image"])
def test_fewer_source_sentences_or_images_than_asked_are_said_as_text_is(kind, tmp_path, caplog):
    """Text with fewer windows than asked warned; a translator's sentences and an image model's images went
    on silently with the ones there were."""
    from PIL import Image
    from transformers import ViTImageProcessor

    from svdlora.calibration_data import calibration_batches

    from .conftest import tiny_vit
    from .eval_helpers import tiny_marian, word_tokenizer

    if kind == "seq2seq":
        tok = word_tokenizer(WORDS)
        model, processor, data = tiny_marian(len(tok)), tok, tmp_path / "source.txt"
        data.write_text("the cat sat\nthe dog ran on the mat\na red tree\n")
    else:
        model, processor, data = tiny_vit().eval(), ViTImageProcessor(size={"height": 16, "width": 16}), tmp_path
        (tmp_path / "cat").mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "cat" / f"{i}.png")
    calibration_batches(model, str(data), processor, 10, 16, progress=False)
    what = "source sentences" if kind == "seq2seq" else "images"
    assert f"--calibration has 3 {what} (asked for 10)" in caplog.text


def test_a_translator_tokenizer_without_a_pad_token_is_refused_saying_what_to_do(tmp_path):
    """Batching the source sentences pads them: a tokenizer without a pad token raised the tokenizer's own
    ValueError ('Asking to pad but the tokenizer does not have a padding token')."""
    from transformers import PreTrainedTokenizerFast

    from svdlora.calibration_data import calibration_batches

    from .eval_helpers import tiny_marian, word_tokenizer

    tok = word_tokenizer(WORDS)
    unpadded = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer), eos_token="</s>")
    unpadded.backend_tokenizer.no_padding()
    (tmp_path / "source.txt").write_text("the cat sat\n")
    with pytest.raises(SvdloraError, match="the tokenizer has no pad token.*the model pads with id 0"):
        calibration_batches(tiny_marian(len(tok)), str(tmp_path / "source.txt"), unpadded, 4, 16, progress=False)


@pytest.mark.parametrize("data", ["self", "text"])
def test_one_token_windows_of_a_causal_lm_are_refused_in_one_line(data, tmp_path):
    """--calibration-length 1 left self-generation no token to write (an 'internal error' from
    generate), and text windows no next token: zero gradients, so kfac/fisher silently became whiten."""
    model, tok = word_gpt2(WORDS)
    (tmp_path / "text.txt").write_text(word_text(WORDS))
    data = "self" if data == "self" else str(tmp_path / "text.txt")
    config = CompressionConfig(budget=0.5, calibration_length=1)
    with pytest.raises(svdlora.SvdloraError, match="--calibration-length 1 is too short"):
        svdlora.compress(model, config, calibration=data, processor=tok, progress=False)


def test_calibration_data_errors_name_the_calibration_flag(monkeypatch):
    """Calibration data goes through the evaluation's dataset reader; its errors name --calibration,
    the flag the user gave, not eval's --data."""
    from svdlora.calibration_data import calibration_batches

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = "no-such-org/no-such-dataset"  # neither a local path nor a cached hub dataset
    model, tokenizer = word_gpt2(["a", "b"])
    with pytest.raises(SvdloraError) as err:
        calibration_batches(model, data, tokenizer, samples=2, length=16)
    assert str(err.value).startswith(f"--calibration {data!r}"), str(err.value)
    assert "--data" not in str(err.value)


def test_a_calibration_dataset_without_a_known_column_says_how_to_read_it(tmp_path):
    """The refusal said "pass --calibration one of ['content']": --calibration takes data, not a column."""
    from svdlora.calibration_data import calibration_batches

    data = tmp_path / "data.json"
    data.write_text("".join(json.dumps({"content": f"a b a b {i}"}) + "\n" for i in range(8)))
    model, tokenizer = word_gpt2(["a", "b"])
    with pytest.raises(SvdloraError, match=r"none of the columns .* \(it has \['content'\]\): rename") as err:
        calibration_batches(model, str(data), tokenizer, samples=2, length=4)
    assert "pass --calibration one of" not in str(err.value)


@pytest.mark.parametrize("data", [123, {"text": "a b"}, ({"input_ids": torch.ones(1, 4, dtype=torch.long)},)])
def test_calibration_that_is_no_data_is_refused_for_what_it_is(data):
    """calibration=123 was refused with "calibration needs the model's tokenizer" (and, given one, read as a path):
    the message says what calibration takes."""
    with pytest.raises(SvdloraError, match=r"calibration must be a text or sentence file, .* list of model batches"):
        svdlora.compress(tiny_gpt2(), budget=0.5, calibration=data, progress=False)


@pytest.mark.parametrize("statistics", [{}, {"transformer.h.9.mlp.c_fc": None}], ids=["empty", "another model's"])
def test_statistics_that_hold_no_targeted_layer_are_refused(statistics):
    """statistics={} (or of another model's layers) gave every layer plain SVD while the report said 'kfac'."""
    batches = [example_inputs("gpt2", seed) for seed in range(2)]
    with pytest.raises(SvdloraError, match=r"statistics holds none of the 8 targeted layers"):
        svdlora.compress(tiny_gpt2(), budget=0.5, calibration=batches, statistics=statistics, progress=False)


@pytest.mark.parametrize("method", ["auto", "kfac"])
def test_statistics_without_calibration_are_refused(method):
    """statistics= without calibration= was ignored: plain SVD, reported as method 'svd' with uniform allocation
    (method 'kfac': refused as needing calibration data, which the statistics are collected from)."""
    model = tiny_gpt2()
    batches = [example_inputs("gpt2", seed) for seed in range(2)]
    stats = collect_statistics(model, find_targets(model, CompressionConfig())[0], batches, progress=False)
    with pytest.raises(SvdloraError, match=r"statistics were given without calibration: pass calibration= the batch"):
        svdlora.compress(model, budget=0.5, method=method, statistics=stats, progress=False)


def test_a_calibration_column_that_is_not_text_is_refused_not_read_as_its_str(tmp_path):
    """A text column of dicts (or lists, numbers) was calibrated on as each value's str(): "{'de': 'a b'}"."""
    import datasets

    from svdlora.calibration_data import calibration_batches

    model, tokenizer = word_gpt2(["a", "b"])
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"text": [{"de": "a b a b"}] * 8}).save_to_disk(str(data))
    with pytest.raises(SvdloraError, match=r"column 'text', which holds a dict \(row 0\), not text"):
        calibration_batches(model, str(data), tokenizer, samples=2, length=4)
    ok = tmp_path / "ok"
    datasets.Dataset.from_dict({"text": ["a b a b a b", None] * 4}).save_to_disk(str(ok))  # empty rows: skipped
    assert calibration_batches(model, str(ok), tokenizer, samples=2, length=4)


@pytest.mark.parametrize("stage_dtypes", [None, ["int8"]])
def test_report_errors_after_healing_are_those_of_the_saved_layers(tmp_path, stage_dtypes):
    """Found by review: the report kept each layer's error from before healing, though healing trains
    the factors (gate_proj: 0.677 reported, 0.680 saved); with quantized stages the save quantizes the
    healed factors again, and the error must be that of those."""
    torch.manual_seed(0)
    model = tiny_llama()
    weights = {n: weight_out_in(m).detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches = [example_inputs("llama", s) | {"labels": example_inputs("llama", s)["input_ids"]} for s in range(2)]
    report = svdlora.compress(
        model, budget=0.5, submatrices=2, stage_dtypes=stage_dtypes, method="whiten", calibration=batches,
        heal_steps=3, heal_loss="lm", heal_lr=1e-2, progress=False,
    )  # fmt: skip
    loaded = svdlora.load_compressed(svdlora.save_compressed(model, tmp_path / "out"), device="cpu")
    for line in report.factorized:
        saved = relative_error(weights[line.name], loaded.get_submodule(line.name).dense_weight())
        assert line.rel_error == pytest.approx(saved, rel=1e-5), line.name
        assert line.exact_error is None  # the reference was of the factors before healing


def test_the_report_says_loss_left_is_of_the_truncation_once_healing_changed_the_factors():
    """Found by review: after healing the 'loss left' column kept the allocation's estimate for the truncated
    SVD beside rel.err measured on the healed factors, and nothing said so (int8 stages: 0 beside 0.24)."""
    batches = [example_inputs("llama", s) | {"labels": example_inputs("llama", s)["input_ids"]} for s in range(2)]

    def why(**options) -> str:
        torch.manual_seed(0)
        report = svdlora.compress(tiny_llama(), budget=0.5, calibration=batches, progress=False, **options)
        assert any(m.est_loss is not None for m in report.modules)  # the column is shown
        return dict(report.summary_rows())["how ranks were chosen"]

    note = "'loss left' is that of the truncation, before healing changed the factors (rel.err is after)"
    assert why(heal_steps=2).endswith(note)
    assert "before" not in why()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refit_statistics_read_each_layers_own_input(dtype):
    # In a half-precision model the tap keeps float32 copies, so a freed input's address came back as a
    # later layer's input of the same shape and that layer was refitted to an earlier layer's inputs.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    batch = {"input_ids": torch.randint(0, 96, (1, 16))}
    seen = {}
    keep = lambda n: lambda module, inputs, output: seen.update({n: inputs[0].detach()})  # noqa: E731
    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    stats = collect_cross_statistics(model, layers, layers, [batch], progress=False)
    assert set(stats) == set(layers)
    for name, (gram, cross) in stats.items():
        x = seen[name].reshape(-1, seen[name].shape[-1]).double()
        expected = x.T @ x / x.shape[0]
        assert torch.allclose(gram, expected, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(cross, expected, rtol=1e-4, atol=1e-6), name  # the dense model is the same here


def test_healing_a_model_without_low_rank_factors_says_so_in_one_line():
    # A full-int8 first stage alone leaves every layer with empty factors: healing crashed in
    # backward() ("element 0 of tensors does not require grad") after the whole compression.
    torch.manual_seed(0)
    dense = tiny_llama().eval()
    batches = [{"input_ids": example_inputs("llama", 0)["input_ids"]}]
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, stage_dtypes="full-int8", progress=False)
    with pytest.raises(SvdloraError, match="no low-rank factor to train"):
        heal(model, batches, steps=2, teacher=dense, progress=False)
    with pytest.raises(SvdloraError, match="--submatrices 2"):  # and compress refuses it before any work
        CompressionConfig(budget=0.5, stage_dtypes="full-int8", heal_steps=2)


@pytest.mark.parametrize("stage_dtypes", ["int4", "full-int4,int8"])
def test_healed_quantized_model_in_memory_is_the_saved_one(tmp_path, caplog, stage_dtypes):
    """Found by review: healing left full-precision factors in memory that the save then quantized
    again, so `compress --eval` measured a model the folder does not hold (int4: logits 0.18 apart)."""
    torch.manual_seed(0)
    model = tiny_llama()
    batches = [example_inputs("llama", s) | {"labels": example_inputs("llama", s)["input_ids"]} for s in range(2)]
    svdlora.compress(
        model, budget=0.5, submatrices=2, stage_dtypes=stage_dtypes, calibration=batches, heal_steps=5,
        heal_loss="lm", heal_lr=1e-2, progress=False,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="svdlora.chain"):
        loaded = svdlora.load_compressed(svdlora.save_compressed(model, tmp_path / "out"), device="cpu")
    assert torch.allclose(output_of(model.eval(), "llama"), output_of(loaded, "llama"), rtol=0, atol=1e-5)
    assert "quantized again" not in caplog.text  # what the folder holds is what the model held


def _padded_and_rows(kind: str, model) -> tuple[dict, list[dict]]:
    """Two sentences as one padded batch (a translator's targets padded with -100 too), and one by one."""
    long, short = torch.arange(5, 13)[None], torch.tensor([[12, 13, 7]])
    pad = model.config.pad_token_id or 0
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    batch = {"input_ids": torch.cat([long, torch.cat([short, torch.full((1, 5), pad)], 1)]), "attention_mask": mask}
    rows = [{"input_ids": long, "attention_mask": torch.ones_like(long)}]
    rows.append({"input_ids": short, "attention_mask": torch.ones_like(short)})
    if kind == "marian":  # the targets are padded too, with -100 after their end
        batch["labels"] = torch.tensor([[20, 21, 22, 23, 0], [30, 0, -100, -100, -100]])
        rows[0]["labels"], rows[1]["labels"] = batch["labels"][:1], batch["labels"][1:, :2]
    else:
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
        rows[0]["labels"], rows[1]["labels"] = long, short
    return batch, rows


def _left_padded(batch: dict) -> dict:
    """``batch`` (a causal LM's) with its padding moved before the real tokens, as a tokenizer with
    ``padding_side="left"`` pads (Llama's, for generation)."""
    mask = batch["attention_mask"]
    order = torch.sort(1 - mask, dim=-1, descending=True, stable=True).indices  # padding first, the tokens' order kept
    return {key: value.gather(-1, order) for key, value in batch.items()}


@pytest.mark.parametrize("kind", ["marian", "llama", "gpt2", "gpt2-left"])
def test_padding_is_not_counted_in_the_statistics(kind):
    # a padded batch (translations of different lengths, or Python batches with a mask, their labels
    # the input ids, padding included) gives the statistics of its sentences run one by one: padded
    # positions are no tokens; a left-padded one runs row by row (GPT-2's positions would move)
    torch.manual_seed(0)
    left = kind.endswith("-left")
    kind = kind.removesuffix("-left")
    model = {"marian": tiny_marian, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind]().eval()
    targets, _ = find_targets(model, CompressionConfig())
    batch, rows = _padded_and_rows(kind, model)
    if kind != "marian":
        batch["labels"] = batch["input_ids"]
    batch = _left_padded(batch) if left else batch
    padded = collect_statistics(model, targets, [batch], progress=False, output_gram=True)
    one_by_one = collect_statistics(model, targets, rows, progress=False, output_gram=True)
    assert padded.keys() == one_by_one.keys()
    for name, stats in one_by_one.items():
        assert padded[name].tokens == stats.tokens
        for field in ("gram", "out_grad_sq", "out_grad_gram"):  # float32 products of other sizes: round-off apart
            torch.testing.assert_close(getattr(padded[name], field), getattr(stats, field), rtol=1e-5, atol=1e-6)


def _tiny_moe(kind: str):
    """A MoE whose expert Linears see the tokens flattened (Qwen2-MoE's shared expert: all of them) or
    routed (Switch Transformers' experts: some of them), not as (batch, length, features)."""
    if kind == "qwen2-moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        config = Qwen2MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, pad_token_id=0,
        )  # fmt: skip
        return Qwen2MoeForCausalLM(config)
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, expert_capacity=64, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=4, pad_token_id=0,
        decoder_start_token_id=0,
    )  # fmt: skip
    return SwitchTransformersForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["qwen2-moe", "switch"])
def test_padding_is_not_counted_in_the_statistics_of_experts(kind):
    # found by review: a padded batch run whole kept the real positions only of layer inputs shaped
    # (batch, length, features); an expert fed the tokens flattened or routed counted the padding
    # (Qwen2-MoE's shared expert: 16 tokens for 11, Grams 1.04 apart); flattened ones now keep the
    # real rows, and a batch with routed ones runs sentence by sentence
    torch.manual_seed(0)
    model = _tiny_moe(kind).eval()
    targets, _ = find_targets(model, CompressionConfig())
    batch, rows = _padded_and_rows("marian" if kind == "switch" else "llama", model)
    if kind != "switch":
        batch["labels"] = batch["input_ids"]
    padded = collect_statistics(model, targets, [batch], progress=False)
    one_by_one = collect_statistics(model, targets, rows, progress=False)
    assert padded.keys() == one_by_one.keys()
    for name, stats in one_by_one.items():
        assert padded[name].tokens == stats.tokens, name
        for field in ("gram", "out_grad_sq"):
            torch.testing.assert_close(getattr(padded[name], field), getattr(stats, field), rtol=1e-5, atol=1e-6)


def test_padding_is_not_counted_in_the_statistics_of_a_length_first_model():
    # found by review: FSMT's layers run (length, batch, features); a padded batch as long as it has
    # rows matched its (batch, length) mask by shape, read transposed (Grams 1.3 apart from the rows)
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    torch.manual_seed(0)
    config = FSMTConfig(
        langs=["en", "de"], src_vocab_size=96, tgt_vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=1, decoder_start_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = FSMTForConditionalGeneration(config).eval()
    targets, _ = find_targets(model, CompressionConfig())
    ids = torch.tensor([[5, 6, 7], [11, 1, 1], [13, 14, 1]])  # 3 sentences of 3, 1 and 2 tokens a side
    labels = torch.tensor([[20, 21, 22], [30, -100, -100], [40, 41, -100]])
    decoder = torch.cat([torch.full((3, 1), 2), labels[:, :-1].clamp_min(1)], 1)
    batch = {"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": labels, "decoder_input_ids": decoder}
    rows = [{key: value[i : i + 1, :length] for key, value in batch.items()} for i, length in enumerate([3, 1, 2])]
    padded = collect_statistics(model, targets, [batch], progress=False)
    one_by_one = collect_statistics(model, targets, rows, progress=False)
    for name, stats in one_by_one.items():
        assert padded[name].tokens == stats.tokens, name
        torch.testing.assert_close(padded[name].gram, stats.gram, rtol=1e-5, atol=1e-6)


def _tiny_gemma3():
    """A vision-language model whose vision tower runs (images, 16 patches) and whose projector pools them
    into 4 image tokens with no Linear (Gemma 3's, as at 4096 patches and 256 tokens)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=96, max_position_embeddings=64, sliding_window=64,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
        vision_use_head=False,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=90, boi_token_index=91,
        eoi_token_index=92, pad_token_id=0,
    )  # fmt: skip
    return Gemma3ForConditionalGeneration(config)


def test_padding_is_not_counted_in_the_statistics_of_a_vision_language_model():
    # found by review: a padded batch run whole gave each layer input the text mask of its (batch, length);
    # Gemma 3's vision tower, as many patches (16) as the text positions, was masked by the text: the
    # second image's last 6 patches left out (26 tokens for 32). A batch with inputs besides its text
    # (pixel_values) now runs row by row, where no mask is applied
    torch.manual_seed(0)
    model = _tiny_gemma3().eval()
    targets, _ = find_targets(model, CompressionConfig())
    image = [2, 91, 90, 90, 90, 90, 92]  # BOS, start of image, its 4 tokens, end of image
    ids = torch.tensor([image + list(range(10, 19)), image + [20, 21, 22] + [0] * 6])
    mask, pixels = (ids != 0).long(), torch.randn(2, 3, 16, 16)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == 90).long(), "labels": ids}
    rows = [{k: v[i : i + 1, :n] for k, v in batch.items()} for i, n in enumerate((16, 10))]
    batch, rows = (
        batch | {"pixel_values": pixels},
        [r | {"pixel_values": pixels[i : i + 1]} for i, r in enumerate(rows)],
    )
    padded, one_by_one = (collect_statistics(model, targets, b, progress=False) for b in ([batch], rows))
    assert padded.keys() == one_by_one.keys() == {t.name for t in targets}
    for name, stats in one_by_one.items():
        assert padded[name].tokens == stats.tokens, name
        torch.testing.assert_close(padded[name].gram, stats.gram, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded[name].out_grad_sq, stats.out_grad_sq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["marian", "llama"])
def test_a_padded_batch_runs_once_in_the_statistics(kind):
    # the statistics ran every padded batch row by row: one forward and backward pass per sentence
    # (a translator's calibration: many short ones); now once, keeping the real positions
    torch.manual_seed(0)
    model = (tiny_marian if kind == "marian" else tiny_llama)().eval()
    targets, _ = find_targets(model, CompressionConfig())
    batch, _ = _padded_and_rows(kind, model)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    collect_statistics(model, targets, [batch], progress=False)
    handle.remove()
    assert len(calls) == 1


def _compressed_and_dense_layers(kind: str) -> tuple[nn.Module, dict, dict]:
    """A tiny model compressed (budget 0.5), its dense layers, its low-rank ones: the refit's inputs."""
    torch.manual_seed(0)
    dense = (tiny_marian if kind == "marian" else tiny_llama)().eval()
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return model, {n: dense.get_submodule(n) for n in layers}, layers


@pytest.mark.parametrize("kind", ["marian", "llama"])
def test_padding_is_not_counted_in_the_refit_statistics(kind):
    # the refit pass ran padded batches as they were: its G̃ and C took in the padded positions'
    # activations (the first pass's statistics already left them out)
    model, originals, layers = _compressed_and_dense_layers(kind)
    batch, rows = _padded_and_rows(kind, model)
    # a second batch: a translator's rows the other way round, a causal LM's left-padded (run row by row)
    other = {k: v.flip(0) for k, v in batch.items()} if kind == "marian" else _left_padded(batch)
    padded = collect_cross_statistics(model, originals, layers, [batch, other], progress=False)
    one_by_one = collect_cross_statistics(model, originals, layers, rows + rows, progress=False)
    assert padded.keys() == one_by_one.keys() == layers.keys()
    for name, (gram, cross) in one_by_one.items():  # float32 products of other sizes: round-off apart
        for got, expected in zip(padded[name], (gram, cross), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["marian", "llama"])
def test_a_padded_batch_runs_once_in_the_refit_statistics(kind):
    # the refit pass ran every padded batch row by row: two forward passes (dense, compressed) per
    # sentence; a right-padded labelled batch now runs whole, as in the first pass's statistics
    model, originals, layers = _compressed_and_dense_layers(kind)
    batch, _ = _padded_and_rows(kind, model)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    left = [_left_padded(batch)] if kind == "llama" else []  # still row by row (batched_masks: None)
    collect_cross_statistics(model, originals, layers, [batch, *left], progress=False)
    handle.remove()
    assert len(calls) == 2 + 4 * len(left)


def test_a_batch_with_a_layer_no_mask_tells_runs_row_by_row_in_the_refit(monkeypatch):
    """A layer input of a batch run whole that no padding mask fits (``Unbatchable``: a routed expert's
    tokens; forced here) stopped the refit pass with that internal exception; that batch now runs row
    by row, as the first pass's statistics do."""
    from svdlora import refit

    model, originals, layers = _compressed_and_dense_layers("marian")
    batch, rows = _padded_and_rows("marian", model)

    def unbatchable(x, masks):
        if masks:
            raise calibration.Unbatchable
        return None

    monkeypatch.setattr(refit, "mask_for", unbatchable)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    got = collect_cross_statistics(model, originals, layers, [batch], progress=False)
    handle.remove()
    assert len(calls) == 2 * len(rows)  # the whole pass stopped inside its dense run (no hook), then the rows
    expected = collect_cross_statistics(model, originals, layers, rows, progress=False)
    assert got.keys() == expected.keys() == layers.keys()
    for name, pair in expected.items():
        for g, e in zip(got[name], pair, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_after_a_batch_no_mask_tells_the_refit_runs_every_batch_row_by_row(monkeypatch):
    # found by review: after one batch raised Unbatchable (a routed expert's input), every later batch
    # was tried whole again, its dense pass run up to that layer for nothing; it now switches once for
    # all, as collect_statistics does
    from svdlora import refit

    model, originals, layers = _compressed_and_dense_layers("marian")
    batch, _ = _padded_and_rows("marian", model)
    attempts = []

    def unbatchable(x, masks):
        if masks:
            attempts.append(1)
            raise padding.Unbatchable
        return None

    monkeypatch.setattr(refit, "mask_for", unbatchable)
    collect_cross_statistics(model, originals, layers, [batch, batch, batch], progress=False)
    assert len(attempts) == 1


def test_refit_multiplies_a_padded_batch_s_inputs_once():
    # the refit ran a padded batch row by row and formed its in×in products (G̃ and C) for every row
    # and layer: several times the padded batch's time on 8-sentence batches of translations; a batch
    # that still runs row by row (left-padded: its positions would move) gathers its rows' inputs first
    from torch.overrides import TorchFunctionMode

    class CountProducts(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            # what `a @ b` calls, on (tokens, in) inputs: not the model's own (batched rotary) products
            CountProducts.count += func is torch.Tensor.matmul and all(a.dim() == 2 for a in args[:2])
            return func(*args, **(kwargs or {}))

    model, originals, layers = _compressed_and_dense_layers("llama")
    batch, rows = _padded_and_rows("llama", model)
    left = _left_padded(batch)
    assert padding.batched_masks(left) is None  # run row by row
    counts = []
    for batches in ([rows[0]], [left]):  # one sentence, then two as a left-padded batch
        CountProducts.count = 0
        with CountProducts():
            collect_cross_statistics(model, originals, layers, batches, progress=False)
        counts.append(CountProducts.count)
    assert counts[0] > 0 and counts[1] == counts[0]


def test_distillation_heals_a_translator():
    # distillation dropped the labels, a translator's batches' only decoder input (source, mask and
    # labels): healing a Marian model stopped at its first step ("You cannot specify both
    # decoder_input_ids and decoder_inputs_embeds", though neither was given)
    torch.manual_seed(0)
    model = tiny_marian().eval()
    batch, _ = _padded_and_rows("marian", model)
    report = svdlora.compress(model, budget=0.5, calibration=[batch], heal_steps=2, progress=False)
    assert report.heal["loss"] == "distill" and report.heal["steps"] == 2
    assert math.isfinite(report.heal["first_loss"])


def _tiny_m2m100():
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    config = M2M100Config(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=2,
    )  # fmt: skip
    return M2M100ForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["marian", "m2m100"])
def test_distillation_feeds_a_translator_s_decoder_what_the_model_does(kind):
    # the labels shifted right came from prepare_decoder_input_ids_from_labels, which M2M100 (NLLB),
    # Blenderbot and Whisper lack: their distillation healing stopped with an AttributeError
    torch.manual_seed(0)
    model = (tiny_marian if kind == "marian" else _tiny_m2m100)().eval()
    batch, _ = _padded_and_rows("marian", model)
    with torch.no_grad():  # the model's own decoder inputs: those it builds from the labels
        torch.testing.assert_close(model(**_distill_inputs(model, batch, True)).logits, model(**batch).logits)
    report = svdlora.compress(model, budget=0.5, calibration=[batch], heal_steps=2, progress=False)
    assert report.heal["loss"] == "distill" and report.heal["steps"] == 2
    if kind == "m2m100":  # nothing to build them from: the error says what to pass
        model.config.decoder_start_token_id = None
        with pytest.raises(SvdloraError, match="decoder_start_token_id.*decoder_input_ids.*--heal-loss lm"):
            heal(model, [batch], steps=1, teacher=copy.deepcopy(model), progress=False)


def test_healing_and_the_batched_statistics_mask_labels_at_padding_with_one_function():
    # found by review: heal._lm_batch (an attention mask of 0/1) repeated padding._masked_labels (bool masks)
    labels = torch.arange(8).reshape(2, 4)
    source = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = torch.tensor([[0, 1, 2, -100], [4, 5, -100, -100]])
    assert torch.equal(padding.masked_labels({"labels": labels}, [source])["labels"], expected)  # healing's
    assert torch.equal(padding.masked_labels({"labels": labels}, [source.bool()])["labels"], expected)  # statistics'
    # the last mask of the labels' shape (an encoder-decoder's target) decides; none of it: the batch as it was
    target = torch.tensor([[True, True, False, False], [True, True, True, True]])
    both = padding.masked_labels({"labels": labels}, [source.bool(), target, None])["labels"]
    assert torch.equal(both, labels.masked_fill(~target, -100))
    batch = {"labels": labels}
    assert padding.masked_labels(batch, [torch.ones(2, 6), None]) is batch


def _sharpened(model: nn.Module) -> nn.Module:
    """``model`` with its Linear weights 4 times larger, in place: sharper outputs, as at the tiny models'
    initial scale a translator's distillation loss (a KL of 1e-6) is in float round-off."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(4)
    return model


@pytest.mark.parametrize(
    ("kind", "loss"),
    [
        *[(kind, loss) for kind in ("llama", "llama-left", "gpt2-left") for loss in ("lm", "distill")],
        ("marian", "lm"),
        ("marian", "distill"),
        ("bert", "distill"),
    ],
)
def test_padding_is_not_counted_in_the_healing_loss(kind, loss):
    # healing's loss on a padded batch is the mean over its sentences' tokens, as if run one by one:
    # the padding of labels that are the input ids (as Python batches often are), a translator's
    # padded targets under distillation, and a bare encoder's padded hidden states counted as tokens.
    # Left padding (Python batches from a tokenizer that pads on the left) also counted the first real
    # token's label, predicted from padding, and shifted the real tokens' positions (GPT-2 numbers them
    # from the cache position, not the mask; Llama's rotary attention sees only their differences)
    torch.manual_seed(0)
    left = kind.endswith("-left")
    kind = kind.removesuffix("-left")
    models = {"llama": tiny_llama, "gpt2": tiny_gpt2, "marian": tiny_marian, "bert": lambda: tiny_bert().bert}
    dense = _sharpened(models[kind]().eval())
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, progress=False)
    batch, rows = _padded_and_rows(kind, model)
    if kind != "marian":
        batch["labels"] = batch["input_ids"]  # padding included: the mask says which tokens are real
    if left:
        batch = _left_padded(batch)

    def first_loss(b: dict) -> float:
        return heal(copy.deepcopy(model), [b], steps=1, teacher=dense, loss=loss, progress=False).first_loss

    # the loss's positions per sentence: its targets (a causal LM's first token is predicted by none)
    positions = [r["labels"].shape[1] - (kind != "marian" and loss == "lm") for r in rows]
    expected = sum(n * first_loss(r) for n, r in zip(positions, rows, strict=True)) / sum(positions)
    assert first_loss(batch) == pytest.approx(expected, rel=1e-4)  # 6e-6 apart at most, measured


def _unlabelled_translations(model, left: bool = False) -> tuple[dict, list[dict]]:
    """Two sources of 8 and 3 tokens padded into one batch (the short one's padding after it, or before it:
    ``left``) with decoder inputs and no labels (nothing tells where a target ends); and one by one."""
    long, short = torch.arange(5, 13)[None], torch.tensor([[12, 13, 7]])
    pad = torch.full((1, 5), model.config.pad_token_id)
    ids = torch.cat([long, torch.cat([pad, short] if left else [short, pad], 1)])
    start = model.config.decoder_start_token_id
    decoder = torch.tensor([[start, 20, 21, 22], [start, 30, 31, 32]])
    batch = {
        "input_ids": ids,
        "attention_mask": (ids != model.config.pad_token_id).long(),
        "decoder_input_ids": decoder,
    }
    rows = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "decoder_input_ids": decoder[i : i + 1]}
        for i, x in enumerate((long, short))
    ]
    return batch, rows


@pytest.mark.parametrize("stage", ["statistics", "refit", "heal"])
def test_an_unlabelled_translator_batch_keeps_its_whole_decoder_inputs(stage):
    # found by review: padding.unpadded_rows cut each row of an encoder-decoder batch after its last
    # real target token, and with neither labels nor decoder_attention_mask to tell it, after the
    # first: a padded batch with decoder inputs ran its decoder on one of their 4 tokens (statistics,
    # refit; healing where the source is left-padded); decoder inputs that tell no padding stay whole
    torch.manual_seed(0)
    if stage == "statistics":
        got, expected = _statistics_of_batch_and_rows(_unlabelled_translations)
    elif stage == "refit":
        model, originals, layers = _compressed_and_dense_layers("marian")
        batch, rows = _unlabelled_translations(model)
        got, expected = (collect_cross_statistics(model, originals, layers, b, progress=False) for b in ([batch], rows))
    else:  # healing runs a left-padded batch row by row; the rows' means weighted by their 4 positions each
        losses = _first_healing_losses(lambda model: _unlabelled_translations(model, left=True))
        got, expected = losses[0], sum(losses[1:]) / (len(losses) - 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _statistics_of_batch_and_rows(make_batches) -> list[dict]:
    """{layer: (tokens, Gram, E[g²])} of a tiny Marian's statistics on the padded batch, then on its rows one
    by one, that ``make_batches(model)`` gives."""
    model = tiny_marian().eval()
    targets, _ = find_targets(model, CompressionConfig())
    batch, rows = make_batches(model)
    return [
        {n: (s.tokens, s.gram, s.out_grad_sq) for n, s in collect_statistics(model, targets, b, progress=False).items()}
        for b in ([batch], rows)
    ]


def _first_healing_losses(make_batches, loss: str = "distill") -> list[float]:
    """The first healing loss of a tiny Marian compressed (budget 0.5; its dense teacher ``_sharpened``) on the
    padded batch, then on each of the rows, that ``make_batches(model)`` gives."""
    dense = _sharpened(tiny_marian().eval())
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, progress=False)
    batch, rows = make_batches(model)
    return [
        heal(copy.deepcopy(model), [b], steps=1, teacher=dense, loss=loss, progress=False).first_loss
        for b in [batch, *rows]
    ]


def test_a_padded_batch_with_several_images_to_a_text_row_is_refused_naming_the_tensor():
    # found by review: a padded batch with inputs besides its text runs row by row (827f044), each row taking
    # pixel_values[i : i + 1]; with 3 images for 2 texts (Gemma 3, LLaVA: (images, C, H, W)) the first row got
    # one of its two images and the second the first row's second (Gemma 3: "Image features and image tokens
    # do not match"): such a batch cannot be split by row, and is refused in one line naming the tensor
    torch.manual_seed(0)
    model = _tiny_gemma3().eval()
    targets, _ = find_targets(model, CompressionConfig())
    image = [91, 90, 90, 90, 90, 92]
    ids = torch.tensor([[2, *image, *image, 10, 11], [2, *image, 20, 21, 0, 0, 0, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": (ids == 90).long()}
    batch |= {"labels": ids, "pixel_values": torch.randn(3, 3, 16, 16)}
    with pytest.raises(SvdloraError, match=r"'pixel_values' has 3 entries for 2 rows.*one text each"):
        collect_statistics(model, targets, [batch], progress=False)
    unpadded = {k: v[:1] if k != "pixel_values" else v[:2] for k, v in batch.items()}  # nothing to split: runs whole
    assert collect_statistics(model, targets, [unpadded], progress=False)


@pytest.mark.parametrize("left", [False, True])
def test_a_translation_without_a_real_target_token_is_left_out_as_a_whole(left):
    # found by review: a row whose labels are all -100 kept one decoder token when run row by row (a
    # left-padded source), its activations in the decoder's Gram; run whole, its decoder was masked but
    # its source counted: the two passes differed. Such a row, no loss and nothing for the decoder, is
    # left out as a whole, as a row whose source is padding only is
    torch.manual_seed(0)
    model = tiny_marian().eval()
    targets, _ = find_targets(model, CompressionConfig())
    batch, rows = _padded_and_rows("marian", model)
    batch["labels"][1] = -100
    if left:  # the short source's padding before it
        batch = batch | {k: batch[k].clone() for k in ("input_ids", "attention_mask")}
        for key in ("input_ids", "attention_mask"):
            batch[key][1] = batch[key][1].roll(5)
    padded = collect_statistics(model, targets, [batch], progress=False)
    first = collect_statistics(model, targets, rows[:1], progress=False)
    assert padded.keys() == first.keys()
    for name, stats in first.items():
        assert padded[name].tokens == stats.tokens, name
        torch.testing.assert_close(padded[name].gram, stats.gram, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded[name].out_grad_sq, stats.out_grad_sq, rtol=1e-5, atol=1e-6)


def _left_padded_targets(model) -> tuple[dict, list[dict]]:
    """Two translations padded into one batch, the short target's padding before it (a decoder_attention_mask
    with 0 before a real token, as a tokenizer with ``padding_side="left"`` pads); and one by one."""
    ids = torch.tensor([list(range(5, 13)), [12, 13, 7] + [model.config.pad_token_id] * 5])
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    batch = {
        "input_ids": ids,
        "attention_mask": (ids != pad).long(),
        "decoder_input_ids": torch.tensor([[start, 20, 21, 22], [pad, pad, start, 30]]),
        "decoder_attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
        "labels": torch.tensor([[20, 21, 22, 23], [-100, -100, 30, 31]]),
    }
    source, target = (slice(None), slice(0, 3)), (slice(None), slice(2, None))
    rows = [{k: v[:1] for k, v in batch.items()}]
    rows.append({k: v[1:][source if k in ("input_ids", "attention_mask") else target] for k, v in batch.items()})
    return batch, rows


@pytest.mark.parametrize("stage", ["statistics", "heal-distill", "heal-lm"])
def test_a_target_padded_before_its_tokens_is_run_without_its_padding(stage):
    # found by review: only the source's attention_mask was read for padding before a real token; a target
    # padded on the left (decoder_attention_mask) ran whole, its real tokens at moved positions (Marian numbers
    # them from 0), and the statistics counted its padding (through the last real token): such a batch now
    # runs row by row, each target without its padding
    torch.manual_seed(0)
    if stage == "statistics":
        got, expected = _statistics_of_batch_and_rows(_left_padded_targets)
    else:  # the rows' means weighted by their 4 and 2 target positions
        first = _first_healing_losses(_left_padded_targets, stage.removeprefix("heal-"))
        got, expected = first[0], (4 * first[1] + 2 * first[2]) / 6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_batches_of_many_lengths_keep_one_work_buffer_per_width(monkeypatch):
    # a gradient buffer per batch length grew with every distinct length (rows of padded batches):
    # with batches of 2..41 tokens it held 40 of them; now what the longest batch run twice needs
    torch.manual_seed(0)
    model = tiny_llama().eval()
    targets, _ = find_targets(model, CompressionConfig())
    held = []
    result = _Accumulator.result

    def spy(self):
        held.append(sum(b.numel() * b.element_size() for b in self._buffers.values()))
        return result(self)

    monkeypatch.setattr(_Accumulator, "result", spy)
    batches = [
        {"input_ids": torch.randint(0, 90, (1, n)), "labels": torch.randint(0, 90, (1, n))} for n in range(2, 42)
    ]
    collect_statistics(model, targets, batches, progress=False, output_gram=True)
    collect_statistics(model, targets, batches[-1:] * 2, progress=False, output_gram=True)  # the sums' buffers too
    assert held[0] == held[1]


def test_the_report_counts_the_tokens_without_padding():
    model, tok = word_gpt2(WORDS)
    tok.pad_token = tok.pad_token or tok.unk_token
    ids = tok([word_text(WORDS, 20), word_text(WORDS, 9)], return_tensors="pt", padding=True)
    batches = [{**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}]
    report = svdlora.compress(model, CompressionConfig(budget=0.5), calibration=batches, progress=False)
    assert report.to_dict()["calibration"]["tokens"] == int(ids["attention_mask"].sum()) < ids["input_ids"].numel()


@pytest.mark.parametrize("flag", ["--calibration-samples", "--calibration-length"])
@pytest.mark.parametrize("command", ["compress", "extract", "extract-default", "sweep"])
def test_a_calibration_size_without_calibration_is_refused(tmp_path, capsys, monkeypatch, command, flag):
    """--calibration none (extract's default) with --calibration-samples / --calibration-length N ran without
    a word about N, which reads nothing: refused before the model loads, naming the flag and the fix."""
    # compress_run takes load_pretrained at its import: patched there first (a first import under the patch of
    # svdlora.models kept _never_called for good, and the tests after it failed, in some orders)
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    monkeypatch.setattr("svdlora.models.load_pretrained", _never_called)  # extract's and sweep's (imported late)
    model, out = tmp_path / "model", tmp_path / "out"
    extract = ["extract", "--base", model, "--tuned", model, "--budget", "0.1", "-o", out]
    args = {
        "compress": ["compress", model, "-o", out, "--calibration", "none"],
        "extract": [*extract, "--calibration", "none"],
        "extract-default": extract,
        "sweep": ["sweep", model, "--data", tmp_path / "text.txt", "-o", out, "--calibration", "none"],
    }[command]
    line = _one_line_error(capsys, *args, flag, "8", "--no-progress")
    assert f"{flag} 8 has no effect with --calibration none" in line and "--calibration DATA" in line, line
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_a_calibration_size_that_auto_leaves_unread_is_warned_about(tmp_path, capsys, stream):
    """--calibration auto means none for a translator (in memory) and for a streamed causal LM: a
    --calibration-samples / --calibration-length given with it was ignored without a word."""
    torch.manual_seed(0)
    (tiny_llama() if stream else tiny_marian()).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    flags = ["--stream"] if stream else []
    args = ["compress", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--no-progress", *flags]
    assert main([*args, "--calibration-samples", "8", "--calibration-length", "16"]) == 0
    err = capsys.readouterr().err
    for flag, value in (("--calibration-samples", 8), ("--calibration-length", 16)):
        assert f"warning: {flag} {value} has no effect: --calibration auto reads no data" in err, err


def _never_read(*args, **kwargs):
    raise AssertionError("calibration data read (or generated) that method 'svd' with uniform allocation never uses")


def test_calibration_plain_svd_does_not_use_is_not_read(gpt2_with_tokenizer, tmp_path, capsys, caplog, monkeypatch):
    """--method svd --allocation uniform read the calibration data (or, the CLI's default for a causal LM,
    generated text with the model) only to warn that it was unused. As a streamed run does, it now warns
    without reading anything and compresses as without data; the CLI's default 'auto' then means none, quietly."""
    root = gpt2_with_tokenizer
    monkeypatch.setattr("svdlora.calibration_data.calibration_batches", _never_read)
    model, tok = word_gpt2(WORDS)
    plain = copy.deepcopy(model)
    svdlora.compress(plain, budget=0.5, progress=False)
    report = svdlora.compress(
        model, budget=0.5, method="svd", allocation="uniform", calibration=str(root / "text.txt"), processor=tok,
        progress=False,
    )  # fmt: skip
    assert "calibration data is not used by method 'svd'" in caplog.text and report.calibration is None
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    caplog.clear()
    argv = ["compress", root / "dense", "-o", tmp_path / "out", "--method", "svd", "--allocation", "uniform"]
    assert main([str(a) for a in [*argv, "--no-progress"]]) == 0
    assert "not used" not in capsys.readouterr().err + caplog.text  # the default: no data given, none unused
    sweep = ["sweep", root / "dense", "--data", root / "text.txt", "-o", tmp_path / "s", "--budgets", "0.5"]
    sweep += ["--calibration", root / "text.txt", "--method", "svd", "--allocation", "uniform", "--no-progress"]
    sweep += ["--max-length", "16", "--limit", "2"]
    assert main([str(a) for a in sweep]) == 0
    assert capsys.readouterr().err.count("calibration data is not used") == 1
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["calibration"] is None


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_compress_eval_without_a_tokenizer_is_refused_before_loading(tmp_path, capsys, monkeypatch, stream):
    """compress --eval DATA on a folder without tokenizer files loaded, compressed and wrote the model, and only
    then failed to evaluate it: the folder's tokenizer is now read (and refused) before the load."""
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    (tmp_path / "text.txt").write_text(word_text(WORDS))
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    monkeypatch.setattr("svdlora.cli.compress_run.compress_checkpoint", _never_called)
    args = [
        "compress",
        tmp_path / "llama",
        "-o",
        tmp_path / "out",
        "--calibration",
        "none",
        "--eval",
        tmp_path / "text.txt",
    ]
    line = _one_line_error(capsys, *args, *stream, "--no-progress")
    assert "cannot load the tokenizer" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_compress_eval_of_a_model_no_task_fits_is_refused_before_loading(tmp_path, capsys, monkeypatch, stream):
    """compress --eval on a model no evaluation task fits (a BERT classifier) was refused as 'cannot tell which
    task ... pass --task', a flag compress does not have (and, before the early check, once the model was
    compressed and written): it is now refused before the load, saying to drop --eval."""
    from .eval_helpers import word_tokenizer

    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "bert")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "bert")
    (tmp_path / "text.txt").write_text(word_text(WORDS))
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    monkeypatch.setattr("svdlora.cli.compress_run.compress_checkpoint", _never_called)
    args = ["compress", tmp_path / "bert", "-o", tmp_path / "out", "--eval", tmp_path / "text.txt"]
    line = _one_line_error(capsys, *args, *stream, "--no-progress")
    assert "BertForSequenceClassification: drop --eval" in line and "--task" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "sweep"])
def test_what_the_model_kind_refuses_is_refused_before_loading(tmp_path, capsys, monkeypatch, command):
    """--calibration self for a translation model, and --calibration-length 1 for a causal LM, were refused only
    once the model was loaded (calibration_data.calibration_batches): the folder's config says so before."""
    from .eval_helpers import tiny_marian, word_tokenizer

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    tok = word_tokenizer(WORDS)
    tiny_marian(len(tok)).save_pretrained(tmp_path / "marian")
    for folder in ("llama", "marian"):
        tok.save_pretrained(tmp_path / folder)
    (tmp_path / "text.txt").write_text(word_text(WORDS))
    capsys.readouterr()  # save_pretrained's progress bars
    monkeypatch.setattr("svdlora.models.load_pretrained", _never_called)
    monkeypatch.setattr("svdlora.cli.compress_run.load_pretrained", _never_called)
    tail = {"compress": [], "sweep": ["--data", tmp_path / "text.txt", "--references", tmp_path / "text.txt"]}
    base = [command, tmp_path / "marian", "-o", tmp_path / "out", *tail[command], "--no-progress"]
    line = _one_line_error(capsys, *base, "--calibration", "self")
    assert "--calibration self generates text, which needs a causal language model" in line, line
    base = [command, tmp_path / "llama", "-o", tmp_path / "out", *tail[command][:2], "--no-progress"]
    line = _one_line_error(capsys, *base, "--calibration-length", "1")  # --calibration auto: self here
    assert "--calibration-length 1 is too short" in line, line
    assert not (tmp_path / "out").exists()


def test_refit_with_plain_svd_runs_as_with_data_it_leaves_unread(gpt2_with_tokenizer, tmp_path, capsys, caplog):
    """--refit is not run with method 'svd' (a warning, data or not). Once 'svd' with uniform allocation left
    the data unread, a sweep given --calibration DATA compressed without it, and every budget was refused as
    'the refit pass needs calibration data' ('list larger ones'); compress's default 'auto', now none there,
    was refused the same way after the load. Both now run, as compress given the data does, with the warning."""
    root = gpt2_with_tokenizer
    plain = ["--method", "svd", "--allocation", "uniform", "--refit", "--no-progress"]
    assert main([str(a) for a in ["compress", root / "dense", "-o", tmp_path / "out", *plain]]) == 0
    assert "refit pass is not run with method 'svd'" in caplog.text
    sweep = ["sweep", root / "dense", "--data", root / "text.txt", "-o", tmp_path / "s", "--budgets", "0.5,0.8"]
    sweep += ["--calibration", root / "text.txt", "--max-length", "16", "--limit", "2", *plain]
    assert main([str(a) for a in sweep]) == 0
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["budget"] for p in record["points"]] == [0.5, 0.8] and not record["skipped"]
    with pytest.raises(SvdloraError, match=r"refit pass \(--refit\) needs calibration data"):
        svdlora.compress(tiny_gpt2(), budget=0.5, refit=True, progress=False)  # 'auto' would refit with data


@pytest.mark.parametrize("left", [False, True])
def test_a_healing_batch_with_nothing_to_predict_says_so(left):
    # found by review: a left-padded batch whose rows are one token each (nothing to predict) crashed in
    # torch.isfinite on a float 0 (c309bd1); right-padded, its nan loss said "healing diverged: lower --heal-lr"
    torch.manual_seed(0)
    dense = tiny_llama().eval()
    model = copy.deepcopy(dense)
    svdlora.compress(model, budget=0.5, progress=False)
    ids, mask = torch.tensor([[5, 0], [6, 0]]), torch.tensor([[1, 0], [1, 0]])
    batch = (
        {"input_ids": ids.flip(-1), "attention_mask": mask.flip(-1)}
        if left
        else {"input_ids": ids, "attention_mask": mask}
    )
    with pytest.raises(SvdloraError, match="no position to learn from"):
        heal(model, [batch | {"labels": batch["input_ids"]}], steps=1, loss="lm", progress=False)


def test_a_classifier_batch_with_class_labels_calibrates_as_without_them():
    """Class labels (batch,) beside a classifier's logits (batch, classes) were read as a causal LM's
    token labels: logits[:, :-1] reshaped to (-1, classes) failed. The Fisher samples the model's own
    prediction, so the labels change nothing."""
    torch.manual_seed(0)
    model = tiny_bert().eval()
    targets, _ = find_targets(model, CompressionConfig(budget=0.5))
    ids = torch.randint(0, 96, (3, 10))
    plain = collect_statistics(model, targets, [{"input_ids": ids}], progress=False)
    labels = torch.tensor([0, 2, 1])
    labelled = collect_statistics(model, targets, [{"input_ids": ids, "labels": labels}], progress=False)
    assert plain.keys() == labelled.keys() and plain
    for name, stats in plain.items():
        assert torch.equal(stats.gram, labelled[name].gram)
        assert torch.equal(stats.out_grad_sq, labelled[name].out_grad_sq)


@pytest.mark.parametrize("item", ["the cat sat on the mat", torch.tensor([[1, 2, 3]])], ids=["text", "tensor"])
def test_a_calibration_list_of_other_than_batches_is_a_clear_error(item):
    """A list of texts (or of bare input_ids) crashed in the statistics (AttributeError: ... has no attribute 'get')."""
    model = tiny_gpt2().eval()
    with pytest.raises(SvdloraError, match="item 0 is a (str|Tensor): tokenize it first"):
        svdlora.compress(model, budget=0.5, method="kfac", calibration=[item], progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_one_batch_given_without_its_list_is_a_clear_error():
    """calibration={"input_ids": ...} (one batch, no list) was read as a path: "needs the model's tokenizer"."""
    with pytest.raises(SvdloraError, match=r"calibration is one batch .*: pass a list of batches, \[batch\]"):
        svdlora.compress(tiny_gpt2().eval(), calibration=example_inputs("gpt2"), method="kfac", progress=False)


def test_a_processor_given_by_name_is_a_clear_error(tmp_path):
    """processor="gpt2" (a name, not the loaded tokenizer) crashed: TypeError: 'str' object is not callable."""
    (tmp_path / "text.txt").write_text("the cat sat on the mat " * 20)
    model = tiny_gpt2().eval()
    with pytest.raises(SvdloraError, match="processor= takes the model's tokenizer itself, loaded .* got str 'gpt2'"):
        svdlora.compress(model, calibration=tmp_path / "text.txt", processor="gpt2", progress=False)


@pytest.mark.parametrize("empty", [{}, "datasetdict"])
def test_empty_calibration_mapping_is_called_empty_not_one_batch(empty):
    """{} (or a DatasetDict with no splits) passed the one-batch check, all() of nothing being True."""
    import datasets

    data = datasets.DatasetDict() if empty == "datasetdict" else empty
    with pytest.raises(SvdloraError, match="calibration is empty"):
        svdlora.compress(tiny_gpt2().eval(), calibration=data, method="kfac", progress=False)


def test_healing_on_an_empty_batch_list_says_there_is_no_data():
    """heal(model, [], n) ran no step and said 'healing ran no step: raise --heal-steps or --heal-seconds'."""
    model = tiny_gpt2().eval()
    svdlora.compress(model, budget=0.5, progress=False)
    with pytest.raises(SvdloraError, match="healing has no data: the list of batches is empty"):
        heal(model, [], 3, teacher=tiny_gpt2().eval(), progress=False)


class _BareTensorModel(nn.Module):
    """A plain module whose forward returns a bare tensor: no logits, no hidden states to distill."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(self.a(x))


def test_healing_a_model_without_logits_is_refused_before_the_statistics(monkeypatch):
    """compress(heal_steps=N) of a module returning a bare tensor collected the statistics and factorized every
    layer before heal() refused its outputs; one forward on the first batch refuses it first."""

    def never(*args, **kwargs):
        raise AssertionError("the statistics were collected before the model's outputs were checked")

    monkeypatch.setattr("svdlora.plan.collect_statistics", never)
    model = _BareTensorModel()
    with pytest.raises(SvdloraError, match="healing needs a model that returns logits or hidden states"):
        svdlora.compress(model, budget=0.5, method="whiten", calibration=[{"x": torch.randn(4, 32)}],
                         heal_steps=2, progress=False)  # fmt: skip
    assert model.training  # the check's eval() is undone


def test_lm_healing_of_a_module_whose_forward_takes_no_labels_is_one_clean_refusal():
    """heal_loss='lm' on a plain forward(x): the early check's model(**batch) passed labels=, and the
    TypeError escaped raw (an 'internal error' in the CLI); it is refused, naming the inputs and the way out."""
    model = _BareTensorModel()
    batch = {"x": torch.randn(4, 32), "labels": torch.randn(4, 32)}
    with pytest.raises(SvdloraError, match=r"calls the model with \['labels', 'x'\].*--heal-loss distill"):
        svdlora.compress(model, budget=0.5, method="whiten", calibration=[batch], heal_steps=2, heal_loss="lm",
                         progress=False)  # fmt: skip
    assert model.training


def test_a_calibration_file_whose_name_begins_with_self_is_not_data_free(tmp_path, monkeypatch):
    """The report took every source named 'self…' for text the model generated: a file 'selfies.txt' given by
    a relative path was recorded data-free (the rule lived in the plan's description and again in the sweep's)."""
    monkeypatch.chdir(tmp_path)
    model, tok = word_gpt2(WORDS)
    (tmp_path / "selfies.txt").write_text(word_text(WORDS))
    report = svdlora.compress(
        model, budget=0.5, method="whiten", allocation="uniform", calibration="selfies.txt", processor=tok,
        calibration_samples=2, calibration_length=16, progress=False,
    )  # fmt: skip
    assert report.calibration["source"] == "selfies.txt" and report.calibration["data_free"] is False


def _quiet_compress(model, tok, tmp_path):
    return lambda data: svdlora.compress(model, budget=0.5, calibration=data, processor=tok, progress=False)


def _quiet_plan(model, tok, tmp_path):
    from svdlora.compress import calibration_plan

    return lambda data: calibration_plan(model, budget=0.5, calibration=data, processor=tok, progress=False)


def _quiet_stream(model, tok, tmp_path):
    from svdlora.streaming.pipeline import compress_checkpoint

    model.save_pretrained(tmp_path / "dense")  # its own bar, before the one looked for
    return lambda data: compress_checkpoint(
        tmp_path / "dense", tmp_path / "out", budget=0.5, calibration=data, processor=tok, progress=False
    )


def _quiet_extract(model, tok, tmp_path):
    from svdlora.extract.pipeline import extract_adapter

    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    return lambda data: extract_adapter(model, tuned, budget=0.5, calibration=data, processor=tok, progress=False)


def _quiet_batches(model, tok, tmp_path):
    from svdlora.calibration_data import calibration_batches

    return lambda data: calibration_batches(model, data, tok, samples=2, length=16, progress=False)


@pytest.mark.parametrize("quiet_run", [_quiet_compress, _quiet_plan, _quiet_stream, _quiet_extract, _quiet_batches])
def test_calibration_from_a_dataset_file_without_progress_shows_no_bar(tmp_path, capsys, quiet_run):
    """compress, calibration_plan, compress_checkpoint, extract_adapter and calibration_batches with progress=False
    and a dataset file as calibration still drew datasets' 'Generating train split' bar, which nothing switched off
    (nor the CLI)."""
    import datasets

    words = "the cat sat on a mat and the dog ran to it".split()
    model, tok = word_gpt2(words)
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": word_text(words, 60)}) + "\n" for _ in range(4)))
    run = quiet_run(model, tok, tmp_path)
    capsys.readouterr()
    run(str(data))
    err = capsys.readouterr().err
    assert "Generating train split" not in err and "it/s" not in err, err
    assert datasets.is_progress_bar_enabled()  # set back: the caller's other reads keep their bars


@pytest.mark.parametrize("stream", [False, True])
def test_a_calibration_length_beyond_the_positions_is_said_once(gpt2_with_tokenizer, caplog, stream):
    """--calibration-length 100 on a model of 64 positions calibrated on 64-token windows without a word; the default
    length (512, more than tiny models' positions) is not the user's, so it says nothing."""
    root = gpt2_with_tokenizer
    said = "--calibration-length 100 is more than the model's 64 positions"
    for length, count in ((["--calibration-length", "100"], 1), ([], 0)):
        caplog.clear()
        args = ["compress", root / "dense", "-o", root / "out", "--overwrite", "--calibration", root / "text.txt"]
        code = main(
            [str(a) for a in [*args, "--calibration-samples", "2", *length, "--no-progress"]] + stream * ["--stream"]
        )
        assert code == 0 and caplog.text.count(said) == count == caplog.text.count("positions"), caplog.text


def test_the_length_warning_of_self_generated_text_names_its_cap(caplog):
    """Self-generated windows are at most SELF_LENGTH (256) tokens: on a model of more positions the warning said
    'the windows are 512 tokens' where they were 256 (found by the session's review)."""
    from svdlora.calibration_data import SELF, SELF_LENGTH, warn_if_cut

    model = tiny_llama()
    model.config.max_position_embeddings = 512
    warn_if_cut(model, 1000, SELF)
    assert f"more than self-generated text's {SELF_LENGTH} tokens: the windows are {SELF_LENGTH} tokens" in caplog.text
    caplog.clear()
    warn_if_cut(model, 1000, "text.txt")
    assert "more than the model's 512 positions: the windows are 512 tokens" in caplog.text
