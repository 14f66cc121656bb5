"""The two MNIST benchmarks end to end in --quick mode, and the IDX reader.

The data is the shared MNIST folder next to the repository (../shared/data/mnist); the
end-to-end tests skip when it is absent, since users of the project need not have it.
"""

import gzip
import json
from pathlib import Path

import pytest
import torch

from benchmarks import mnist_blog, nnsvd
from benchmarks.mnist import accuracy, available, load_mnist

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not available(MNIST), reason=f"MNIST not found at {MNIST}")


@pytest.fixture(autouse=True)
def restore_threads():
    # The benchmarks' main() sets torch's thread count (default 1); give the next test its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_idx(path: Path, magic: int, array: torch.Tensor) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_idx_reader_on_synthetic_files(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28))
    labels = torch.tensor([3, 1, 4, 1, 5])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, labels)
    x, y = load_mnist(tmp_path, "test", limit=4)
    assert x.shape == (4, 784) and x.dtype == torch.float32
    assert torch.allclose(x, images[:4].reshape(4, -1).float() / 255)
    assert y.tolist() == [3, 1, 4, 1]
    with pytest.raises(FileNotFoundError, match="--data"):
        load_mnist(tmp_path, "train")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, labels)  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path, "test")


@needs_mnist
def test_real_mnist_shapes_and_accuracy_helper():
    x, y = load_mnist(MNIST, "test", limit=100)
    assert x.shape == (100, 784) and 0 <= x.min() and x.max() <= 1
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the official test set's first labels
    model = torch.nn.Linear(784, 10)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.nn.functional.one_hot(torch.tensor(1), 10).float())
    assert accuracy(model, x, y) == pytest.approx((y == 1).float().mean().item())


@needs_mnist
def test_mnist_blog_quick(tmp_path):
    results = mnist_blog.main(["--quick", "--data", str(MNIST), "--results-dir", str(tmp_path)])
    run = results["runs"][0]
    assert run["fc1_ranks"] == [10] and run["fc1_params_after"] == 10 * (500 + 784)
    assert len(run["singular_values"]) == 500 and 0 < run["explained_variance_at_rank"] < 1
    assert results["storage"]["usv_kxk"] == 12_940  # the post's count
    assert set(run["finetune"]) == {"factors+biases", "all"}
    for name in ("mnist_blog_quick.json", "mnist_blog_quick.md", "mnist_blog_quick.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "mnist_blog_quick.json").read_text())["machine"]["device"]
    md = (tmp_path / "mnist_blog_quick.md").read_text()
    assert "Command: `python -m benchmarks.mnist_blog --quick" in md and "0.9149" in md


@needs_mnist
def test_nnsvd_quick(tmp_path):
    results = nnsvd.main(["--quick", "--data", str(MNIST), "--results-dir", str(tmp_path)])
    methods = {(r["method"], r["scope"], r["rank"], r["alpha"]) for r in results["runs"]}
    assert ("full", "all", None, 0.0) in methods
    for method in nnsvd.METHODS:
        assert (method, "all", 8, 0.0) in methods and (method, "hidden", 8, 0.0) in methods
    assert ("symmetric", "all", 8, 1e-3) in methods
    # Proposition 3 is a theorem: it must hold on every image.
    assert results["bound"] and all(b["holds_fraction"] == 1.0 for b in results["bound"])
    for suffix in (".json", ".md", "_rank_sweep.png", "_dso.png", "_bound.png"):
        assert (tmp_path / f"nnsvd_quick{suffix}").stat().st_size > 0
    assert "### Differences" in (tmp_path / "nnsvd_quick.md").read_text()
