"""--runtime auto: each layer runs in the layout that is faster, measured on its device."""

import contextlib

import pytest
import torch
from torch import nn

from svdlora import SvdloraError, compress, load_compressed, save_compressed
from svdlora import runtime as runtime_module
from svdlora.layers import LowRankLinear
from svdlora.pivoted import PivotedLowRankLinear
from svdlora.runtime import apply_runtime, measure, read_as_weight, rule_prefers_factorized

from .conftest import TINY_MODELS, output_of, tiny_llama, tiny_t5


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.thin = nn.Linear(1024, 1024)  # rank 16: factorized moves 3% of the values
        self.full = nn.Linear(1024, 1024)  # rank 1000: factorized moves 2x the values

    def forward(self, x):
        return self.full(self.thin(x))


def test_auto_never_picks_the_slower_layout():
    torch.manual_seed(0)
    model = TwoLayers()
    model.thin = LowRankLinear.from_dense(model.thin, [16])
    model.full = LowRankLinear.from_dense(model.full, [1000])
    layouts = apply_runtime(model, "auto")
    assert layouts == {"thin": "factorized", "full": "merged"}
    assert isinstance(model.thin, LowRankLinear) and isinstance(model.full, nn.Linear)
    # An independent re-measurement agrees, with the documented rule.
    for (m, n, r), picked in [((1024, 1024, 16), "factorized"), ((1024, 1024, 1000), "merged")]:
        measure.cache_clear()
        times = measure(m, n, r, "cpu", torch.float32, 1)
        assert set(times) == {"factorized", "merged"}  # a pair has no "pairs" layout to try
        assert (times["factorized"] <= times["merged"]) == (picked == "factorized") == rule_prefers_factorized(m, n, r)


def test_auto_merges_a_layer_with_a_full_rank_stage(monkeypatch):
    """Such a layer multiplies by its dense first stage and then by the pair: merged is one dense
    matmul of the same size, however fast the pair alone measures (here: fastest)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 96))
    compress(model, budget=0.6, stage_dtypes=["full-int8", "float32"], submatrices=2, progress=False)
    assert model[0].full is not None and model[0].ranks
    x = torch.randn(2, 96)
    with torch.no_grad():
        want = model(x)
    monkeypatch.setattr(runtime_module, "measure", lambda *args: {"factorized": 1e-6, "merged": 1e-3})
    assert apply_runtime(model, "auto") == {"0": "merged"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def _count_captures(monkeypatch) -> list:
    captured, real = [], runtime_module.replayed
    monkeypatch.setattr(runtime_module, "replayed", lambda fn, *a: captured.append(fn) or real(fn, *a))
    return captured


def test_auto_graphs_times_eager_calls_off_cuda(monkeypatch):
    """CUDA graphs exist on CUDA devices only: elsewhere "auto-graphs" measures and picks as "auto"."""
    torch.manual_seed(0)
    model = TwoLayers()
    model.thin = LowRankLinear.from_dense(model.thin, [16])
    model.full = LowRankLinear.from_dense(model.full, [1000])
    captured = _count_captures(monkeypatch)
    measure.cache_clear()
    assert apply_runtime(model, "auto-graphs") == {"thin": "factorized", "full": "merged"}
    assert captured == []


def _random_pair(out_features: int, in_features: int, rank: int) -> LowRankLinear:
    """A factor pair of random factors, built without an SVD (8192-wide layers: fast)."""
    module = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)  # its weight is not read
    a, b = torch.randn(out_features, rank) / rank**0.5, torch.randn(rank, in_features) / in_features**0.5
    return LowRankLinear.from_factors(module, a, b, [rank])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_auto_graphs_on_cuda_times_graph_replays(monkeypatch):
    """On CUDA each layout is captured in a graph and its replays timed, and the picks keep the
    outputs. The shapes leave no doubt even at the GPU's per-kernel latency floor, where layers of
    1024 x 1024 merge whatever their rank (H200, 2026-11-27): rank 64 of 8192 x 8192 reads 1.6% of
    the dense values as a pair, rank 8000 reads 1.95x."""
    torch.manual_seed(0)
    model = TwoLayers()
    model.thin, model.full = _random_pair(8192, 8192, 64), _random_pair(8192, 8192, 8000)
    model = model.cuda()
    x = torch.randn(1, 8192, device="cuda")
    with torch.no_grad():
        want = model(x)
    captured = _count_captures(monkeypatch)
    measure.cache_clear()
    assert apply_runtime(model, "auto-graphs") == {"thin": "factorized", "full": "merged"}
    assert len(captured) == 2 + 2  # factorized and merged of each shape
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-3, atol=1e-3)


def test_runtime_at_load(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "out")
    want = output_of(load_compressed(tmp_path / "out", device="cpu"), "llama")
    merged = load_compressed(tmp_path / "out", device="cpu", runtime="merged")
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    auto = load_compressed(tmp_path / "out", device="cpu", runtime="auto")
    torch.testing.assert_close(output_of(auto, "llama"), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output_of(merged, "llama"), want, rtol=1e-4, atol=1e-5)


def test_pivoted_layer_as_a_pair_computes_the_same():
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    pivoted = PivotedLowRankLinear.from_dense(dense, [6, 4])
    pair = pivoted.to_pairs()
    assert type(pair) is LowRankLinear and pair.ranks == [10] and pair.B is pivoted.B and pair.bias is pivoted.bias
    x = torch.randn(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(pair(x), pivoted(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pair.dense_weight(), pivoted.dense_weight(), rtol=1e-5, atol=1e-6)


def test_auto_runs_a_small_pivoted_layer_as_a_pair():
    """A thin pivoted layer: its two index copies cost more than the R² extra values of the pair
    (rank 16 of 1024: the pair reads 3% of the dense values), so auto takes the pair, and an
    independent re-measurement agrees that it is the fastest layout."""
    torch.manual_seed(0)
    model = TwoLayers()
    model.thin = PivotedLowRankLinear.from_dense(model.thin, [16])
    model.full = PivotedLowRankLinear.from_dense(model.full, [1000])
    x = torch.randn(1, 1024)
    with torch.no_grad():
        want = model(x)
    measure.cache_clear()
    layouts = apply_runtime(model, "auto")
    assert layouts["thin"] == "pairs" and type(model.thin) is LowRankLinear
    measure.cache_clear()
    times = measure(1024, 1024, 16, "cpu", torch.float32, 1, True)
    assert set(times) == {"factorized", "pairs", "merged"} and min(times, key=times.get) == "pairs"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # gpt2: Conv1D layers
def test_runtime_pairs_at_load(tmp_path, kind):
    torch.manual_seed(0)
    model = TINY_MODELS[kind]()
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    stored = load_compressed(tmp_path / "out", device="cpu")
    assert any(isinstance(m, PivotedLowRankLinear) for m in stored.modules())
    want = output_of(stored, kind)
    pairs = load_compressed(tmp_path / "out", device="cpu", runtime="pairs")
    kinds = {type(m) for m in pairs.modules() if isinstance(m, LowRankLinear)}
    assert kinds == {LowRankLinear}
    torch.testing.assert_close(output_of(pairs, kind), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", ["factorized", "pairs", "merged", "auto"])
def test_a_gpt2_layer_s_weight_reads_as_its_conv1d_s_whatever_the_runtime(tmp_path, runtime):
    """GPT-2's Conv1D holds its weight as (in, out) and computes x @ weight + bias; a low-rank layer
    replacing one shows its weight the same way, as the merged Conv1D does (c_proj is square: a
    transposed weight there would give wrong numbers, not an error)."""
    torch.manual_seed(0)
    model = TINY_MODELS["gpt2"]()
    dense = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))}
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out", device="cpu", runtime=runtime)
    with torch.no_grad():
        for name, shape in dense.items():
            layer, x = loaded.get_submodule(name), torch.randn(3, shape[0])
            assert tuple(layer.weight.shape) == shape, name
            torch.testing.assert_close(x @ layer.weight + layer.bias, layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", ["pairs", "merged", "auto", "auto-graphs"])
def test_a_model_whose_layers_a_runtime_changed_is_not_saved(tmp_path, runtime):
    """The folder's report says how each layer is stored; a model loaded as pairs or merged no longer
    matches it, so saving it would write a folder that cannot be loaded: refused, nothing written."""
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    changed = load_compressed(tmp_path / "out", device="cpu", runtime=runtime)
    with pytest.raises(SvdloraError, match="now runs as|loaded merged"):
        save_compressed(changed, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    save_compressed(load_compressed(tmp_path / "out", device="cpu"), tmp_path / "again")  # as stored: saved
    torch.testing.assert_close(
        output_of(load_compressed(tmp_path / "again", device="cpu"), "llama"), output_of(changed, "llama"),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("options", [{"runtime": "pairs"}, {"stack_siblings": True}])
def test_save_pretrained_of_a_model_save_compressed_refuses_says_what_saves_it(tmp_path, options):
    """save_pretrained's refusal named save_compressed, which refuses a model a load-time runtime changed
    ('now runs as ...'): two refusals in a row. It now says why and gives the ways that save it."""
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    changed = load_compressed(tmp_path / "out", device="cpu", **options)
    with pytest.raises(SvdloraError) as refusal:
        changed.save_pretrained(tmp_path / "again")
    assert "now runs as" in str(refusal.value)
    assert 'runtime="factorized"' in str(refusal.value) and "merge=True" in str(refusal.value)
    save_compressed(load_compressed(tmp_path / "out", device="cpu", runtime="factorized"), tmp_path / "again")
    load_compressed(tmp_path / "out", device="cpu", merge=True).save_pretrained(tmp_path / "dense")


@pytest.mark.parametrize("change", ["pairs", "stacked"])
def test_save_pretrained_of_a_model_compressed_in_memory_and_changed_says_what_saves_it(tmp_path, change):
    """Compressed in memory and then changed, a model has no folder to load again, yet both refusals said to load
    it (as stored, or merged): they now give what works in memory (runtime "merged", then save_pretrained; nothing
    unstacks siblings), and that advice saves a checkpoint that loads back with the same outputs."""
    from transformers import AutoModelForCausalLM

    from svdlora import stack_siblings

    torch.manual_seed(0)
    model = tiny_llama().eval()
    compress(model, budget=0.5, pivot=True, progress=False)
    apply_runtime(model, "pairs") if change == "pairs" else stack_siblings(model)
    for save in (model.save_pretrained, lambda folder: save_compressed(model, folder)):
        with pytest.raises(SvdloraError) as refusal:
            save(tmp_path / "refused")
        said = str(refusal.value)
        assert "it was compressed in memory" in said and "merge=True" not in said and "load it" not in said, said
        advice = 'apply_runtime(model, "merged") and save_pretrained' if change == "pairs" else "before stacking"
        assert advice in said
    if change == "pairs":
        want = output_of(model, "llama")
        apply_runtime(model, "merged")
        model.save_pretrained(tmp_path / "dense")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
        torch.testing.assert_close(output_of(reloaded, "llama"), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loaded", [False, True])
def test_a_changed_layout_is_said_changed_in_memory_where_no_load_changed_it(tmp_path, loaded):
    """save_compressed's refusal said '(a load-time runtime: ...)' of a layer apply_runtime changed in memory, in a
    model compressed in memory that had no load; a loaded model may have been changed at load or since."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    compress(model, budget=0.5, pivot=True, progress=False)
    if loaded:
        save_compressed(model, tmp_path / "out")
        model = load_compressed(tmp_path / "out", device="cpu")
    apply_runtime(model, "pairs")
    with pytest.raises(SvdloraError) as refusal:
        save_compressed(model, tmp_path / "refused")
    said = str(refusal.value)
    in_memory = "in memory by svdlora.runtime.apply_runtime or svdlora.stack_siblings)"
    at_load = 'changed at load by runtime="merged", "pairs" or "auto" or stack_siblings=True, or since '
    assert f"now runs as a pair ({at_load if loaded else 'changed '}{in_memory}" in said, said
    assert "load-time" not in said


def test_offloaded_layers_stay_as_stored(tmp_path):
    """accelerate's offload keeps the weights on "meta" and brings them in with a hook on the module:
    a replacement would lose both, so the runtime leaves such layers alone."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, pivot=True, progress=False)
    save_compressed(model, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out", device="cpu")
    want = output_of(loaded, "llama")
    cpu_offload(loaded, execution_device="cpu")
    layouts = apply_runtime(loaded, "pairs")
    assert layouts and set(layouts.values()) == {"factorized"}
    torch.testing.assert_close(output_of(loaded, "llama"), want)


def test_contradictory_merge_and_runtime_are_refused(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "out")
    for runtime in ("factorized", "pairs", "auto"):
        with pytest.raises(SvdloraError, match="contradict"):
            load_compressed(tmp_path / "out", device="cpu", merge=True, runtime=runtime)
    assert not any(
        isinstance(m, LowRankLinear) for m in load_compressed(tmp_path / "out", merge=True, runtime="merged").modules()
    )


def test_pairs_larger_than_dense_are_warned_about(caplog):
    """At a high budget a pivoted layer's rank makes its pair form bigger than the dense matrix."""
    torch.manual_seed(0)
    model = TwoLayers()
    model.thin = PivotedLowRankLinear.from_dense(model.thin, [16])  # as pairs: 3% of the dense values
    model.full = PivotedLowRankLinear.from_dense(model.full, [900])  # as pairs: 1.76x the dense values
    with caplog.at_level("WARNING", logger="svdlora.runtime"):
        apply_runtime(model, "pairs")
    warned = [r.getMessage() for r in caplog.records if "more values as pairs than dense" in r.getMessage()]
    assert len(warned) == 1 and "1 layers" in warned[0] and "full" in warned[0]


def test_auto_choosing_pairs_larger_than_dense_does_not_advise_auto(caplog, monkeypatch):
    """runtime='auto' that timed such a pair fastest warned "runtime='merged' or 'auto' is smaller
    there": auto was what the user had asked for, and the choice was auto's own."""
    torch.manual_seed(0)
    model = TwoLayers()
    model.full = PivotedLowRankLinear.from_dense(model.full, [900])  # as pairs: 1.76x the dense values
    monkeypatch.setattr(runtime_module, "measure", lambda *args: {"factorized": 2e-3, "pairs": 1e-3, "merged": 3e-3})
    with caplog.at_level("WARNING", logger="svdlora.runtime"):
        assert apply_runtime(model, "auto")["full"] == "pairs"
    warned = [r.getMessage() for r in caplog.records if "more values as pairs than dense" in r.getMessage()]
    assert len(warned) == 1 and "'auto'" not in warned[0] and "runtime='merged'" in warned[0]


def test_replayed_captures_on_the_stream_it_warmed_up_on(monkeypatch):
    """torch.cuda.graph's default capture stream is created once, on the GPU current at the first
    capture: a layer on another GPU (device_map) would launch its kernels outside the capture. The
    capture uses the stream made on the layer's device, the one the warm-up ran on."""
    made, captures = [], []

    class FakeStream:
        def __init__(self):
            made.append(self)

        def wait_stream(self, other):
            pass

    class FakeGraph:
        def replay(self):
            pass

    def fake_graph(graph, pool=None, stream=None, **kwargs):
        captures.append(stream)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    calls = []
    runtime_module.replayed(lambda: calls.append(1), calls=3, warmups=2)
    assert len(calls) == 2 + 3
    assert captures == [made[0]], "captured on torch.cuda.graph's default stream, not the warm-up's"


def test_a_failed_capture_is_one_clear_error(monkeypatch):
    """A capture the driver refuses ends in a SvdloraError that names the way out (eager timing), not a
    raw RuntimeError after the whole load. The CUDA path is entered with a fake device check."""

    def refuse(fn, *a, **k):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(runtime_module, "replayed", refuse)
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: real_to(t, *[x for x in a if x != "cuda:7"], **k))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    measure.cache_clear()
    with pytest.raises(
        SvdloraError, match=r"capture of a 64x32 rank-4 layer failed on cuda:7 \(operation not permitted"
    ):
        measure(64, 32, 4, "cuda:7", torch.float32, 1, False, True)
    measure.cache_clear()


@pytest.mark.parametrize("runtime", ["merged", "pairs"])
def test_a_runtime_keeps_frozen_layers_frozen_and_the_mode(runtime):
    """A layer rebuilt as dense (or as a pair) keeps the layer's requires_grad and train/eval mode:
    merged turned the frozen factors of a model prepared for adapter training into a trainable
    dense weight (nn.Linear's default), while pairs kept them frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
    model[0] = LowRankLinear.from_dense(model[0], [4])
    model[1] = PivotedLowRankLinear.from_dense(model[1], [4])
    model.eval().requires_grad_(False)
    apply_runtime(model, runtime)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("runtime", ["merged", "pairs"])
def test_a_runtime_keeps_each_parameter_s_requires_grad(runtime):
    """Bias-only training (factors frozen, bias trainable) and the reverse: merged collapsed the layer's flags into
    one, so the frozen factors' dense weight trained (or a frozen bias did); pairs keep each parameter's."""
    torch.manual_seed(0)
    for trained in ("bias", "factors"):
        model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
        model[0] = LowRankLinear.from_dense(model[0], [4])
        model[1] = PivotedLowRankLinear.from_dense(model[1], [4])
        for name, p in model.named_parameters():
            p.requires_grad_((name.endswith("bias")) == (trained == "bias"))
        apply_runtime(model, runtime)
        flags = {name.rpartition(".")[2]: p.requires_grad for name, p in model.named_parameters()}
        assert flags.pop("bias") == (trained == "bias") and set(flags.values()) == {trained == "factors"}, flags


@pytest.mark.parametrize("runtime", ["merged", "pairs"])
def test_layers_converted_under_inference_mode_still_train(runtime):
    """A runtime applied under inference_mode (an evaluation before fine-tuning) leaves normal
    tensors: merged layers held inference tensors, and the first backward raised 'Inference tensors
    cannot be saved for backward' (pairs already made normal ones)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
    model[0] = LowRankLinear.from_dense(model[0], [4])
    model[1] = PivotedLowRankLinear.from_dense(model[1], [4])
    with torch.inference_mode():
        apply_runtime(model, runtime)
    model(torch.randn(3, 24)).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.inference_mode():  # layers made of inference tensors (a folder loaded there) convert too
        model = nn.Sequential(PivotedLowRankLinear.from_dense(nn.Linear(24, 16), [4]))
        want = model(torch.ones(1, 24))
        apply_runtime(model, runtime)
        torch.testing.assert_close(model(torch.ones(1, 24)), want)


def _saved(tmp_path, build) -> str:
    torch.manual_seed(0)
    model = build()
    compress(model, budget=0.5, progress=False)
    save_compressed(model, tmp_path / "out")
    return tmp_path / "out"


def test_auto_merges_the_layers_a_models_forward_reads_as_weight(tmp_path, monkeypatch):
    """T5's feed-forward reads self.wo.weight.dtype on every call, which multiplies a low-rank wo's
    A·B: auto merges the wo layers without timing them and leaves the others to timing (here timed
    as factorized), with the outputs unchanged."""
    folder = _saved(tmp_path, tiny_t5)
    factorized = load_compressed(folder, device="cpu", runtime="factorized")
    stored = {name for name, m in factorized.named_modules() if isinstance(m, LowRankLinear)}
    monkeypatch.setattr(runtime_module, "measure", lambda *args: {"factorized": 1e-6, "merged": 1e-3})
    auto = load_compressed(folder, device="cpu", runtime="auto")
    wo = {name for name in stored if name.endswith(".wo")}
    assert len(wo) == 4 and all(type(auto.get_submodule(name)) is nn.Linear for name in wo)
    assert all(isinstance(auto.get_submodule(name), LowRankLinear) for name in stored - wo)
    want = output_of(factorized, "t5")
    torch.testing.assert_close(output_of(auto, "t5"), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "runtime", "warned"),
    [(tiny_t5, "factorized", 4), (tiny_t5, "pairs", 4), (tiny_t5, None, 4), (tiny_llama, "factorized", 0)],
)
def test_a_runtime_keeping_layers_read_as_weight_warns(tmp_path, caplog, build, runtime, warned):
    """Also the default (None: as stored), which a user who never heard of runtimes loads with."""
    folder = _saved(tmp_path, build)
    with caplog.at_level("WARNING", logger="svdlora.runtime"):
        load_compressed(folder, device="cpu", runtime=runtime)
    messages = [r.getMessage() for r in caplog.records if "read as .weight" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert messages[0].startswith(f"{warned} layers (encoder.block.0.layer.1.DenseReluDense.wo, ")
        assert "runtime='auto' or 'merged'" in messages[0]


@pytest.mark.parametrize("merge", [False, True])
def test_from_pretrained_warns_of_layers_read_as_weight_unless_merged(tmp_path, caplog, merge):
    """Plain from_pretrained keeps every layer factorized (T5's wo too, ~4x dense per decoder step) and said nothing,
    where load_compressed warns: it warns with its own way out, and not when merging."""
    from transformers import AutoModelForSeq2SeqLM

    from svdlora.integrations import SvdloraQuantizationConfig

    folder = _saved(tmp_path, tiny_t5)
    options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
    with caplog.at_level("WARNING", logger="svdlora.runtime"):
        AutoModelForSeq2SeqLM.from_pretrained(folder, **options)
    messages = [r.getMessage() for r in caplog.records if "read as .weight" in r.getMessage()]
    assert len(messages) == (0 if merge else 1), messages
    if not merge:
        assert messages[0].startswith("4 layers (") and "SvdloraQuantizationConfig(merge=True)" in messages[0]


def test_layers_read_as_weight_are_found_in_the_parents_forward_source():
    """nn.MultiheadAttention passes self.out_proj.weight to its functional forward; a class whose
    forward has no source (built at runtime) is not detected rather than failing."""
    attention = nn.MultiheadAttention(16, 2)
    attention.out_proj = LowRankLinear.from_dense(attention.out_proj, [4])
    assert read_as_weight(attention) == ["out_proj"]
    namespace = {}
    exec("def forward(self, x):\n    return x @ self.fc.weight.T", namespace)  # no file to read the source from
    parent = type("Built", (nn.Module,), {"forward": namespace["forward"]})()
    parent.fc = LowRankLinear.from_dense(nn.Linear(8, 8), [2])
    assert read_as_weight(nn.Sequential(parent)) == []
