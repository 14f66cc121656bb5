"""stack_siblings: layers that read the same input compute their input side in one matmul."""

import pytest
import torch
from torch import nn

from svdlora import SvdloraError, compress, load_compressed, save_compressed
from svdlora.layers import LowRankLinear
from svdlora.pivoted import PivotedLowRankLinear
from svdlora.siblings import StackedProjection, StackedSibling, find_siblings, stack_siblings

from .conftest import example_inputs, output_of, tiny_llama, tiny_marian, tiny_t5, tiny_vit


def _folder(tmp_path, model, **options):
    torch.manual_seed(0)
    compress(model, budget=0.5, progress=False, **options)
    save_compressed(model, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("pivot", [False, True])
def test_stacked_llama_computes_the_same(tmp_path, pivot):
    folder = _folder(tmp_path, tiny_llama(), pivot=pivot)
    want = output_of(load_compressed(folder, device="cpu"), "llama")
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    for block in model.model.layers:
        attention = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
        mlp = [block.mlp.gate_proj, block.mlp.up_proj]
        for siblings in (attention, mlp):
            assert all(isinstance(s, StackedSibling) for s in siblings)
            assert len({id(s.projection) for s in siblings}) == 1
            assert isinstance(siblings[0].stacked, StackedProjection)  # registered once, on the first
            assert all(not hasattr(s, "stacked") for s in siblings[1:])
            assert all(s.pivoted == pivot and not isinstance(s, LowRankLinear) for s in siblings)
        assert isinstance(block.self_attn.o_proj, LowRankLinear) and isinstance(block.mlp.down_proj, LowRankLinear)
    assert isinstance(block.self_attn.o_proj, PivotedLowRankLinear) == pivot
    torch.testing.assert_close(output_of(model, "llama"), want, rtol=1e-5, atol=1e-6)
    # the kept products are dropped once every sibling has read them
    kept = [m.kept for m in model.modules() if isinstance(m, StackedProjection)]
    assert len(kept) == 4 and all(k.product is None and k.input is None for k in kept)


def test_one_product_per_group_and_call(tmp_path):
    """Per forward pass, each group multiplies by its stacked weight once: three q/k/v products and
    two gate/up products become one each."""
    folder = _folder(tmp_path, tiny_llama())
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    products = []
    real_linear = torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):
        if any(weight is m.weight for m in model.modules() if isinstance(m, StackedProjection)):
            products.append(weight.shape)
        return real_linear(x, weight, bias)

    groups = sum(isinstance(m, StackedProjection) for m in model.modules())
    import svdlora.siblings as siblings

    siblings.F.linear = counting_linear
    try:
        output_of(model, "llama")
    finally:
        siblings.F.linear = real_linear
    assert groups == 4 and len(products) == groups


@pytest.mark.parametrize("runtime", ["factorized", "pairs"])  # pivoted as stored, and as pairs
def test_generate_gives_the_same_tokens(tmp_path, runtime):
    folder = _folder(tmp_path, tiny_llama(), pivot=True)
    prompt = torch.tensor([[1, 5, 9, 3]])
    runs = {}
    for stacked in (False, True):
        model = load_compressed(folder, device="cpu", runtime=runtime, stack_siblings=stacked)
        with torch.no_grad():
            runs[stacked] = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(runs[False], runs[True])


def test_inference_mode_and_gradients(tmp_path):
    """inference_mode tensors have no version counter: stacking still runs (on identity). With
    autograd, the stacked weight gets exactly the gradients the separate B factors would."""
    folder = _folder(tmp_path, tiny_llama())
    plain = load_compressed(folder, device="cpu")
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    inputs = example_inputs("llama")
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-6)
    for m in (plain, model):
        m(**inputs).logits.square().mean().backward()
    attention = plain.model.layers[1].self_attn
    stacked = model.model.layers[1].self_attn.q_proj.stacked
    want = torch.cat([attention.q_proj.B.grad, attention.k_proj.B.grad, attention.v_proj.B.grad])
    torch.testing.assert_close(stacked.weight.grad, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.model.layers[1].self_attn.k_proj.A.grad, attention.k_proj.A.grad)


def test_walks_over_low_rank_layers_leave_stacked_siblings_alone(tmp_path):
    """Runtimes and healing look for LowRankLinear layers; a stacked sibling is not one: a runtime
    leaves it as it is, healing refuses the model."""
    from svdlora.heal import heal
    from svdlora.runtime import apply_runtime

    folder = _folder(tmp_path, tiny_llama())
    want = output_of(load_compressed(folder, device="cpu"), "llama")
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    layouts = apply_runtime(model, "merged")
    assert len(layouts) == 4 and set(layouts.values()) == {"merged"}  # o_proj and down_proj of 2 blocks
    assert sum(isinstance(m, StackedSibling) for m in model.modules()) == 10
    torch.testing.assert_close(output_of(model, "llama"), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(SvdloraError, match="stacked"):
        heal(model, [example_inputs("llama")], steps=1, teacher=load_compressed(folder, device="cpu"))


def test_the_dso_penalty_of_a_stacked_model_is_refused_not_partial(tmp_path):
    """Found by review: a stacked model trains (its gradients are tested above), but dso_penalty walks the
    LowRankLinear layers, so it left out every stacked sibling's factors without a word."""
    from svdlora.training import dso_penalty

    model = load_compressed(_folder(tmp_path, tiny_llama()), device="cpu", stack_siblings=True)
    with pytest.raises(SvdloraError, match="stacked .*: train a model loaded without stack_siblings"):
        dso_penalty(model)


def test_cross_attention_keys_and_values_are_grouped_apart_from_queries(tmp_path):
    """In a decoder's cross-attention, k and v read the encoder's output and q the decoder's state:
    k/v are siblings, q is not one of them. Every decoder layer reads the same encoder output, but a
    group stays within one parent module (one layer), so blocks can still be placed one by one."""
    folder = _folder(tmp_path, tiny_marian())
    want = output_of(load_compressed(folder, device="cpu"), "marian")
    model = load_compressed(folder, device="cpu").train()  # traced in eval mode, left as it was
    groups = find_siblings(model)  # the model's own dummy_inputs (with decoder inputs)
    assert model.training and all(m.training for m in model.modules())
    cross = sorted(g for g in groups if any("encoder_attn" in n for n in g))
    layers = len(model.model.decoder.layers)
    assert len(cross) == layers and all(sorted(n.rsplit(".", 1)[1] for n in g) == ["k_proj", "v_proj"] for g in cross)
    assert all(len({n.rpartition(".")[0] for n in g}) == 1 for g in groups)
    assert sum("self_attn" in g[0] for g in groups) == 2 * layers  # q/k/v of the encoder's and decoder's own
    stack_siblings(model.eval(), example_inputs("marian"))
    torch.testing.assert_close(output_of(model, "marian"), want, rtol=1e-5, atol=1e-6)


def test_a_marian_folder_loads_stacked(tmp_path):
    """Found by review: load_compressed(stack_siblings=True) asks the meta skeleton for its dummy_inputs,
    which Marian builds on its own (meta) device, and moving them failed: 'NotImplementedError: Cannot copy
    out of meta tensor; no data!'."""
    folder = _folder(tmp_path, tiny_marian())
    want = output_of(load_compressed(folder, device="cpu"), "marian")
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    assert any(isinstance(m, StackedSibling) for m in model.modules())
    torch.testing.assert_close(output_of(model, "marian"), want, rtol=1e-5, atol=1e-6)


def test_a_gated_t5_stacks_its_two_input_projections(tmp_path):
    """T5 with a gated feed-forward: wi_0 and wi_1 read the same input."""
    torch.manual_seed(0)
    model = tiny_t5()
    model.config.update({"feed_forward_proj": "gated-gelu", "is_gated_act": True, "dense_act_fn": "gelu_new"})
    model = type(model)(model.config)
    assert hasattr(model.encoder.block[0].layer[1].DenseReluDense, "wi_1")
    folder = _folder(tmp_path, model)
    want = output_of(load_compressed(folder, device="cpu"), "t5")
    stacked = load_compressed(folder, device="cpu", stack_siblings=True)
    groups = [sorted(n.rsplit(".", 1)[1] for n in g) for g in find_siblings(load_compressed(folder, device="cpu"))]
    assert ["wi_0", "wi_1"] in groups
    torch.testing.assert_close(output_of(stacked, "t5"), want, rtol=1e-5, atol=1e-6)


class ThreeHeads(nn.Module):
    """Two layers on x, one on y: a deliberately wrong group (all three) must still compute right."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (LowRankLinear.from_dense(nn.Linear(16, 12), [4]) for _ in range(3))

    def forward(self, x, y=None, scale_between=False):
        first = self.a(x)
        if scale_between:
            x.mul_(2)  # written in place between two siblings' calls
        return first + self.b(x) + self.c(x if y is None else y)


def _stack_by_hand(model, names):
    layers = [model.get_submodule(n) for n in names]
    stacked = StackedProjection([m.B for m in layers])
    for i, (n, m) in enumerate(zip(names, layers, strict=True)):
        model.set_submodule(n, StackedSibling(m, stacked, i, owner=i == 0))


def test_grouping_follows_the_inputs_and_a_wrong_group_still_computes_right():
    torch.manual_seed(0)
    model = ThreeHeads()
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    assert find_siblings(model, (x, y)) == [["a", "b"]]
    assert sorted(map(sorted, find_siblings(model, (x,)))) == [["a", "b", "c"]]
    with torch.no_grad():
        want = model(x, y)
        want_inplace = model(x.clone(), None, True)
        _stack_by_hand(model, ["a", "b", "c"])  # c reads y: its kept product is of x, not used
        torch.testing.assert_close(model(x, y), want)
        torch.testing.assert_close(model(x.clone(), None, True), want_inplace)  # x changed: recomputed
        torch.testing.assert_close(model(x, y), want)  # nothing stale carried over


def test_a_kept_product_follows_the_weight_and_is_not_copied():
    """A product kept for a sibling that has not run yet is not used once the stacked weight was
    written in place; deepcopy and reset() drop it."""
    import copy

    torch.manual_seed(0)
    model = ThreeHeads()
    _stack_by_hand(model, ["a", "b", "c"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.a(x)  # b and c have not read the product yet
        stacked = model.a.stacked
        assert stacked.kept.product is not None
        twin = copy.deepcopy(model)
        assert twin.a.stacked.kept.product is None and twin.b.projection is twin.a.stacked
        stacked.weight.zero_()
        assert model.b(x).abs().max() == model.b.bias.abs().max()  # z = 0: only the bias is left
        stacked.reset()
        assert stacked.kept.product is None and stacked.kept.input is None


def test_a_stacked_model_is_not_saved_and_converts_with_to(tmp_path):
    folder = _folder(tmp_path, tiny_llama())
    model = load_compressed(folder, device="cpu", stack_siblings=True)
    with pytest.raises(SvdloraError, match="stacked with others"):
        save_compressed(model, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    want = output_of(model, "llama").double()
    model.double()  # one StackedProjection per group, converted once, seen by every sibling
    assert all(m.projection.weight.dtype == torch.float64 for m in model.modules() if isinstance(m, StackedSibling))
    torch.testing.assert_close(output_of(model, "llama"), want, rtol=1e-5, atol=1e-6)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.weight, q.dense_weight())
    assert q.weight.shape == (q.out_features, q.in_features)


def test_a_stacked_conv1d_s_weight_reads_as_the_conv1d_s():
    """A stacked sibling that replaced a GPT-2 Conv1D shows its weight as the Conv1D held it, (in, out)."""
    from transformers.pytorch_utils import Conv1D

    class TwoConv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(24, 16), Conv1D(16, 16)

        def forward(self, x):
            return self.a(x).sum(-1) + self.b(x).sum(-1)

    torch.manual_seed(0)
    model = TwoConv1D()
    shapes = {name: tuple(getattr(model, name).weight.shape) for name in "ab"}
    model.a, model.b = LowRankLinear.from_dense(model.a, [4]), LowRankLinear.from_dense(model.b, [4])
    x = torch.randn(3, 16)
    assert stack_siblings(model, inputs=x) == [["a", "b"]]
    with torch.no_grad():
        for name, shape in shapes.items():
            layer = getattr(model, name)
            assert isinstance(layer, StackedSibling) and tuple(layer.weight.shape) == shape, name
            torch.testing.assert_close(x @ layer.weight + layer.bias, layer(x), rtol=1e-5, atol=1e-6)


def test_a_model_without_dummy_inputs_asks_for_them(tmp_path):
    with pytest.raises(SvdloraError, match="inputs="):
        stack_siblings(ThreeHeads())
    with pytest.raises(SvdloraError, match="inputs="):  # before anything is read
        load_compressed(tmp_path / "nothing here", model=ThreeHeads(), stack_siblings=True)


def test_a_vision_model_is_asked_for_inputs_before_its_weights_are_read(tmp_path, monkeypatch):
    """transformers' dummy_inputs are input_ids for every model, a ViT included: the load refuses at
    once, naming the way out, which then stacks its q/k/v and computes the same."""
    import svdlora.io.load

    folder = _folder(tmp_path, tiny_vit())
    want = output_of(load_compressed(folder, device="cpu"), "vit")
    monkeypatch.setattr(svdlora.io.load, "read_state", lambda *a, **k: pytest.fail("tensors read before the refusal"))
    with pytest.raises(SvdloraError, match="no dummy_inputs.*inputs="):
        load_compressed(folder, device="cpu", stack_siblings=True)
    monkeypatch.undo()
    model = load_compressed(folder, device="cpu")
    assert len(stack_siblings(model, inputs=example_inputs("vit"))) == 2  # q/k/v of each block
    torch.testing.assert_close(output_of(model, "vit"), want, rtol=1e-5, atol=1e-6)


def test_stacking_a_merged_load_is_refused(tmp_path):
    folder = _folder(tmp_path, tiny_llama())
    for options in ({"merge": True}, {"runtime": "merged"}):
        with pytest.raises(SvdloraError, match="stack_siblings"):
            load_compressed(folder, device="cpu", stack_siblings=True, **options)


def test_a_tokenizers_batch_is_taken_as_keyword_arguments():
    """What a tokenizer returns (a BatchEncoding: a Mapping, not a dict) is passed as keyword
    arguments, as a dict is: it was passed whole as the first argument, and the forward failed."""
    from transformers import BatchEncoding

    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, progress=False)
    inputs = example_inputs("llama")
    assert find_siblings(model, BatchEncoding(inputs)) == find_siblings(model, inputs)


def test_a_failing_forward_is_reported():
    with pytest.raises(SvdloraError, match="forward pass that finds sibling layers failed"):
        stack_siblings(ThreeHeads(), torch.randn(2, 7))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager: functionalized, as inductor compiles it
def test_compiled_stacked_model_computes_the_same(tmp_path, backend):
    """Under torch.compile the kept product is a side effect dynamo replays: one graph, same logits,
    twice in a row (the second call finds the kept state cleared by the first)."""
    folder = _folder(tmp_path, tiny_llama(), pivot=True)
    want = output_of(load_compressed(folder, device="cpu"), "llama")
    model = load_compressed(folder, device="cpu", stack_siblings=True)  # pivoted: its index copies compiled too
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for _ in range(2):
            got = compiled(**example_inputs("llama")).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
