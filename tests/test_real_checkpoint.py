"""The real SmolLM2-135M checkpoint (fetched by scripts/fetch_smollm2.sh); skipped when absent."""

import os
from pathlib import Path

import pytest
import torch

from svdlora import compress, load_compressed, save_compressed
from svdlora.models import load_pretrained

SMOLLM2 = Path(os.environ.get("SVDLORA_HOME", Path.home() / ".cache" / "svdlora")) / "SmolLM2-135M"


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.skip(f"SmolLM2-135M not fetched (run scripts/fetch_smollm2.sh): {SMOLLM2}")
    return SMOLLM2


def test_real_compress_of_first_layers_roundtrips(smollm2_folder, tmp_path):
    """The real compress on real weights, restricted to two decoder layers to stay fast."""
    model = load_pretrained(smollm2_folder).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        dense_logits = model(ids).logits
    report = compress(model, budget=0.5, submatrices=3, include=["re:model\\.layers\\.[01]\\..*"], progress=False)
    assert len(report.factorized) == 14
    fac = report.factorized
    assert sum(m.params_after for m in fac) <= 0.5 * sum(m.params_before for m in fac)
    assert all(0 < m.rel_error < 1 for m in fac)
    out = save_compressed(model, tmp_path / "smol-svd", source=smollm2_folder)
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        compressed_logits = model(ids).logits
        loaded_logits = load_compressed(out, device="cpu")(ids).logits
    assert torch.equal(loaded_logits, compressed_logits)
    assert not torch.allclose(compressed_logits, dense_logits, atol=1e-3), "compression changed something"


@pytest.mark.slow
def test_real_full_compress_budget(smollm2_folder, tmp_path):
    model = load_pretrained(smollm2_folder).eval()
    report = compress(model, budget=0.5, submatrices=3, progress=False)
    assert len(report.factorized) == 210  # every attention and MLP projection; lm_head is tied
    fac = report.factorized
    assert sum(m.params_after for m in fac) <= 0.5 * sum(m.params_before for m in fac)
    out = save_compressed(model, tmp_path / "smol-svd", source=smollm2_folder)
    assert report.bytes_after < 0.65 * report.bytes_before
    merged = load_compressed(out, device="cpu", merge=True)
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-3)
