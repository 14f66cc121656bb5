"""--runtime auto: each layer runs in the layout that is faster, measured on its device."""

import torch
from torch import nn

from svdlora import compress, load_compressed, save_compressed
from svdlora.layers import LowRankLinear
from svdlora.runtime import apply_runtime, measure, rule_prefers_factorized

from .conftest import output_of, tiny_llama


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
        fac, mer = measure(m, n, r, "cpu", torch.float32, 1)
        assert (fac <= mer) == (picked == "factorized") == rule_prefers_factorized(m, n, r)


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
