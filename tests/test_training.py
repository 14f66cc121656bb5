"""svdlora.training: rank-constrained layers, model conversion, the DSO penalty."""

import pytest
import torch
from torch import nn

import svdlora
from svdlora import LowRankLinear, SvdloraError
from svdlora.training import FactorizedLinear, SymmetricLinear, dso_penalty, rank_constrained

from .conftest import tiny_gpt2, tiny_llama


def rank_of(w: torch.Tensor) -> int:
    # Relative tolerance well above float32 round-off of the product of the factors.
    return torch.linalg.matrix_rank(w.detach().double(), rtol=1e-5).item()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_factorized_layer_has_rank_at_most_k(rank):
    layer = FactorizedLinear(40, 24, rank)
    assert isinstance(layer, LowRankLinear)  # saved and counted like a compressed layer
    assert rank_of(layer.dense_weight()) == rank
    x = torch.randn(5, 40)
    assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5)


def test_symmetric_layer_is_symmetric_psd_and_low_rank():
    layer = SymmetricLinear(24, rank=5)
    w = layer.dense_weight().double()
    assert torch.allclose(w, w.T)
    assert torch.linalg.eigvalsh(w).min() > -1e-6  # PSD up to float32 round-off
    assert rank_of(w) == 5
    x = torch.randn(4, 24)
    assert torch.allclose(layer(x), x @ w.float() + layer.bias, atol=1e-5)
    dense = layer.to_dense()
    assert torch.allclose(dense(x), layer(x), atol=1e-5)


def test_symmetric_from_dense_is_exact_for_a_psd_weight_and_rejects_non_square():
    a = torch.randn(4, 16, dtype=torch.float64)
    linear = nn.Linear(16, 16).double()
    with torch.no_grad():
        linear.weight.copy_(a.T @ a)
    layer = SymmetricLinear.from_dense(linear, rank=4)
    assert torch.allclose(layer.dense_weight(), linear.weight, atol=1e-10)
    with pytest.raises(SvdloraError, match="square"):
        SymmetricLinear.from_dense(nn.Linear(16, 8), rank=2)


def test_rank_constrained_converts_layers_that_get_smaller():
    model = mlp()
    replaced = rank_constrained(model, rank=2, symmetric=True)
    assert replaced == ["0", "2", "4"]
    assert type(model[0]) is FactorizedLinear and type(model[4]) is FactorizedLinear  # non-square
    assert isinstance(model[2], SymmetricLinear)
    # rank 13 on 24x24 would need 624 values > 576: that layer stays dense, as compress does.
    model = mlp()
    assert rank_constrained(model, rank=13) == ["0"]
    assert type(model[2]) is nn.Linear


def test_rank_constrained_from_weights_is_the_truncated_svd_and_patterns_apply():
    model = mlp()
    w = model[0].weight.detach().clone()
    assert rank_constrained(model, rank=3, from_weights=True, exclude=["4"]) == ["0", "2"]
    u, s, vh = torch.linalg.svd(w.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(model[0].dense_weight().double(), best, atol=1e-5)
    assert type(model[4]) is nn.Linear
    with pytest.raises(SvdloraError, match="rank"):
        rank_constrained(mlp(), rank=0)


def test_dso_penalty_zero_for_orthogonal_square_factors_positive_otherwise():
    layer = FactorizedLinear(8, 8, 8)
    q1, _ = torch.linalg.qr(torch.randn(8, 8))
    q2, _ = torch.linalg.qr(torch.randn(8, 8))
    with torch.no_grad():
        layer.A.copy_(q1)
        layer.B.copy_(q2)
    model = nn.Sequential(layer)
    assert dso_penalty(model).item() == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        layer.A.mul_(1.1)
    assert dso_penalty(model).item() > 0.1


def test_dso_penalty_matches_definition_and_floor_for_non_square_factors():
    model = nn.Sequential(FactorizedLinear(30, 20, 4), SymmetricLinear(20, 3))
    a, b, s = model[0].A, model[0].B, model[1].A

    def direct(f):
        return (f.T @ f - torch.eye(f.shape[1])).square().sum() + (f @ f.T - torch.eye(f.shape[0])).square().sum()

    expected = direct(a) + direct(b) + 2 * direct(s)
    assert dso_penalty(model).item() == pytest.approx(expected.item(), rel=1e-5)
    # Orthonormal rows reach the floor |n - k|, which no k x n factor can go below.
    q, _ = torch.linalg.qr(torch.randn(30, 4))
    with torch.no_grad():
        b.copy_(q.T)
    assert direct(b).item() == pytest.approx(30 - 4, rel=1e-5)
    assert dso_penalty(nn.Sequential(nn.Linear(3, 3))).item() == 0.0


def test_dso_penalty_of_layers_without_low_rank_factors_is_zero():
    """Found by review: a full-int8 stage alone leaves a layer's A (out, 0) and B (0, in) empty, and each
    empty factor counted its |n - k| floor: a model with no factor to train had penalty Σ(in + out)."""
    model = tiny_llama()
    svdlora.compress(model, budget=0.9, stage_dtypes="full-int8", progress=False)
    assert all(m.A.numel() == 0 for m in model.modules() if isinstance(m, LowRankLinear))
    assert dso_penalty(model).item() == 0.0


def test_gradients_flow_through_factors_and_penalty():
    model = mlp()
    rank_constrained(model, rank=2, symmetric=True)
    loss = model(torch.randn(6, 40)).square().mean() + 1e-3 * dso_penalty(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.fixture
def one_thread():
    # Tiny matmuls: a second thread only adds contention on a shared CPU (40x slower seen here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_a_rank_constrained_model_reduces_loss(one_thread):
    torch.manual_seed(0)
    x = torch.randn(256, 40)
    y = (x[:, :3].sum(1) > 0).long()
    model = mlp()
    rank_constrained(model, rank=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert rank_of(model[0].dense_weight()) <= 4


def test_factorized_linear_factors_are_contiguous(tmp_path):
    """Training layers keep contiguous factors: flattening and safetensors need them."""
    from safetensors.torch import save_file

    from svdlora.training import FactorizedLinear

    layer = FactorizedLinear(32, 16, rank=4)
    torch.nn.utils.parameters_to_vector(layer.parameters())
    save_file(layer.state_dict(), tmp_path / "x.safetensors")


def test_rank_constrained_targets_the_layers_compress_does_gpt2_conv1d_not_the_tied_head():
    """Found by review: only nn.Linear was touched, so on GPT-2 (Conv1D layers, head tied to the embedding)
    rank_constrained replaced the tied lm_head alone, untying it, and left every transformer layer dense."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    square = model.transformer.h[0].attn.c_proj  # Conv1D 32x32, stored (in, out)
    psd = SymmetricLinear.from_dense(_as_linear(square), 2)  # the nearest PSD of its (out, in) weight
    replaced = rank_constrained(model, rank=2, symmetric=True, from_weights=True)
    assert replaced == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, still dense
    assert isinstance(model.transformer.h[0].mlp.c_fc, FactorizedLinear)
    assert torch.allclose(model.transformer.h[0].attn.c_proj.dense_weight(), psd.dense_weight(), atol=1e-6)
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.transformer.h[1].mlp.c_proj.A.grad is not None
    llama = tiny_llama()
    assert "lm_head" not in rank_constrained(llama, rank=2)
    assert rank_constrained(tiny_llama(), rank=2, keep_head=False)[-1] == "lm_head"


def test_a_tied_head_rank_constrained_with_keep_head_false_is_untied_in_the_config():
    """Found by review: keep_head=False replaced GPT-2's tied lm_head and left tie_word_embeddings on, so
    transformers' tie_weights() (resize_token_embeddings calls it) failed: KeyError "attribute 'weight' already
    exists"; the config is now untied, as compress unties a factorized head (swap.untie_factorized_head)."""
    model = tiny_gpt2()
    assert rank_constrained(model, rank=2, keep_head=False)[-1] == "lm_head"
    model.tie_weights()
    assert not model.config.tie_word_embeddings and isinstance(model.lm_head, FactorizedLinear)


def _as_linear(conv1d) -> nn.Linear:
    linear = nn.Linear(conv1d.weight.shape[0], conv1d.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    return linear


def test_a_trained_rank_constrained_model_saves_by_its_state_dict_not_save_compressed():
    """FactorizedLinear's docstring said a model trained with it 'can be saved like a compressed one', and
    save_compressed refuses it (no compression report): the route it now names restores the same outputs."""
    model = tiny_llama().eval()
    rank_constrained(model, 4)
    with pytest.raises(SvdloraError, match="not compressed"):
        svdlora.save_compressed(model, "unused")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = tiny_llama().eval()
    rank_constrained(rebuilt, 4)
    rebuilt.load_state_dict(state)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, rebuilt(ids).logits)
    assert "can be saved like a compressed one" not in FactorizedLinear.__doc__
