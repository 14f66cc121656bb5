"""Reproduce the blog post "Compress a Neural Network with the SVD" with svdlora.

Source: https://datatician.io/posts/svd-compression. Protocol, as in the post: ``SimpleNN`` =
Linear(784, 500) -> ReLU -> Linear(500, 10) (``fc1``, ``fc2``), inputs in [0, 1] (``ToTensor()``,
no mean/std normalization), Adam lr 1e-3, batch 64, one epoch over the 60,000 training images,
accuracy on the 10,000 test images. Then the spectrum of ``fc1``, ``compress(model, rank=10,
include=["fc1"])`` and the test accuracy again. Added here: a few-step fine-tune of the
compressed model (fc1's two factors and both biases trained, fc2's weight frozen; same optimizer
and batch size; one pass over N training samples, every N started from the same compressed
model) to count the samples needed to get back to the dense accuracy; and several seeds.

Usage:
    python -m benchmarks.mnist_blog --data ../shared/data/mnist
    python -m benchmarks.mnist_blog --quick          # seconds: 2,000 images, one seed
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import DEFAULT_RESULTS, machine_info, stopwatch, write_results
from benchmarks.mnist import DEFAULT_MNIST, accuracy, load_mnist
from svdlora import compress

logger = logging.getLogger(__name__)

NAME = "mnist_blog"
SOURCE = {
    "title": "Compress a Neural Network with the SVD",
    "url": "https://datatician.io/posts/svd-compression",
    "dense_accuracy": 0.9616,
    "compressed_accuracy": 0.9149,
    "rank": 10,
    "fc1_values_dense": 392_000,
    # U_k (500x10) + S_k counted as a full 10x10 matrix + V_k (784x10): 5,000 + 100 + 7,840.
    "fc1_values_compressed": 12_940,
}
SWEEP_RANKS = (1, 2, 5, 10, 20, 50, 100, 200)


class SimpleNN(nn.Module):
    """The post's network: 784 -> 500 -> 10 with a ReLU in between."""

    def __init__(self, hidden: int = 500) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def train_stream(
    model: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    n_samples: int,
    generator: torch.Generator,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> int:
    """Adam on ``params`` over the first ``n_samples`` of back-to-back shuffled passes over (x, y).

    The stream depends only on the generator, so a smaller ``n_samples`` sees a prefix of what
    a larger one sees; ``n_samples = len(x)`` is one ordinary epoch. Returns the number of steps.
    """
    model.train()
    optimizer = torch.optim.Adam(params, lr=lr)
    passes = -(-n_samples // len(x))
    order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(passes)])[:n_samples]
    steps = 0
    for i in range(0, n_samples, batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def finetune_sizes(n_train: int, max_epochs: int = 4) -> list[int]:
    """64, 128, 256, ... while below one epoch, then 1, 2, 4, ... epochs up to ``max_epochs``."""
    sizes, n = [], 64
    while n < n_train:
        sizes.append(n)
        n *= 2
    epochs = 1
    while epochs <= max_epochs:
        sizes.append(epochs * n_train)
        epochs *= 2
    return sizes


# What the fine-tune trains: the brief's "factors + biases" (fc2's weight frozen), and everything.
FINETUNE_PARAMS = {
    "factors+biases": lambda m: [m.fc1.A, m.fc1.B, m.fc1.bias, m.fc2.bias],
    "all": lambda m: list(m.parameters()),
}


def run_seed(seed: int, data: dict, rank: int, finetune_epochs: int = 4) -> dict:
    """Train, inspect, compress and fine-tune one SimpleNN; every number for one seed."""
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    torch.manual_seed(seed)
    model = SimpleNN()
    init_weight = model.fc1.weight.detach().double().clone()
    init_sigma = torch.linalg.svdvals(init_weight)
    with stopwatch() as train_time:
        shuffle = torch.Generator().manual_seed(seed)
        train_stream(model, list(model.parameters()), x_train, y_train, len(x_train), shuffle)
    dense_acc = accuracy(model, x_test, y_test)

    sigma = torch.linalg.svdvals(model.fc1.weight.detach().double())
    energy = (sigma**2).cumsum(0) / (sigma**2).sum()

    def rank_for(fraction: float) -> int:
        return int((energy < fraction).sum().item()) + 1

    compressed = copy.deepcopy(model)
    report = compress(compressed, rank=rank, include=["fc1"], progress=False)
    fc1 = next(m for m in report.modules if m.name == "fc1")
    compressed_acc = accuracy(compressed, x_test, y_test)

    sweep = {}
    for k in SWEEP_RANKS:
        if k < min(fc1.shape):
            m = copy.deepcopy(model)
            compress(m, rank=k, include=["fc1"], progress=False)
            sweep[str(k)] = accuracy(m, x_test, y_test)

    finetune, reached = {}, {}
    for variant, params in FINETUNE_PARAMS.items():
        finetune[variant], reached[variant] = [], None
        for n in finetune_sizes(len(x_train), finetune_epochs):
            tuned = copy.deepcopy(compressed)
            stream = torch.Generator().manual_seed(10_000 + seed)
            steps = train_stream(tuned, params(tuned), x_train, y_train, n, stream)
            acc = accuracy(tuned, x_test, y_test)
            finetune[variant].append({"samples": n, "steps": steps, "accuracy": acc})
            if reached[variant] is None and acc >= dense_acc:
                reached[variant] = n
    return {
        "seed": seed,
        "train_seconds": train_time(),
        "dense_accuracy": dense_acc,
        "compressed_accuracy": compressed_acc,
        "rel_error": fc1.rel_error,
        "fc1_ranks": fc1.ranks,
        "fc1_params_before": fc1.params_before,
        "fc1_params_after": fc1.params_after,
        "model_params_before": report.model_params_before,
        "model_params_after": report.model_params_after,
        "singular_values": [round(s, 6) for s in sigma.tolist()],
        "explained_variance_at_rank": energy[rank - 1].item(),
        # The same quantity for fc1 at initialisation: how much of the spectrum one epoch changed.
        "init_explained_variance_at_rank": ((init_sigma[:rank] ** 2).sum() / (init_sigma**2).sum()).item(),
        "fc1_change_from_init": (
            torch.linalg.matrix_norm(model.fc1.weight.detach().double() - init_weight)
            / torch.linalg.matrix_norm(init_weight)
        ).item(),
        "rank_for_explained_variance": {str(f): rank_for(f) for f in (0.9, 0.95, 0.99)},
        "rank_sweep_accuracy": sweep,
        "finetune": finetune,
        "finetune_samples_to_dense": reached,
    }


def storage(rank: int, out_features: int = 500, in_features: int = 784) -> dict:
    """fc1 storage: dense, the post's U_k + S_k (k x k) + V_k count, and our two factors."""
    dense = out_features * in_features
    post = rank * out_features + rank * rank + rank * in_features
    ours = rank * (out_features + in_features)
    return {
        "dense": dense,
        "usv_kxk": post,
        "usv_kxk_fraction": post / dense,
        "usv_diagonal": ours + rank,
        "two_factors": ours,
        "two_factors_fraction": ours / dense,
    }


def summarize(runs: list[dict]) -> dict:
    def stats(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    reached = {v: [r["finetune_samples_to_dense"][v] for r in runs] for v in FINETUNE_PARAMS}
    return {
        "dense_accuracy": stats("dense_accuracy"),
        "compressed_accuracy": stats("compressed_accuracy"),
        "rel_error": stats("rel_error"),
        "explained_variance_at_rank": stats("explained_variance_at_rank"),
        "init_explained_variance_at_rank": stats("init_explained_variance_at_rank"),
        "fc1_change_from_init": stats("fc1_change_from_init"),
        "finetune_samples_to_dense": reached,
        "seeds_reaching_dense": {v: sum(n is not None for n in ns) for v, ns in reached.items()},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = results["protocol"]["rank"]
    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    first = runs[0]
    sigma = torch.tensor(first["singular_values"])
    energy = (sigma**2).cumsum(0) / (sigma**2).sum()
    idx = range(1, len(sigma) + 1)

    ax = axes[0]
    ax.plot(idx, sigma, ".", ms=3)
    ax.axvline(rank, color="tab:red", ls="--", lw=1, label=f"k = {rank}")
    ax.set(
        yscale="log", xlabel="index i", ylabel="singular value σ_i", title=f"Scree plot of fc1 (seed {first['seed']})"
    )
    ax.legend()

    ax = axes[1]
    ax.plot(idx, energy, lw=1.5)
    ax.axvline(rank, color="tab:red", ls="--", lw=1)
    ax.axhline(energy[rank - 1], color="tab:red", ls=":", lw=1)
    ax.annotate(
        f"{energy[rank - 1]:.1%} at k = {rank}",
        (rank, energy[rank - 1].item()),
        xytext=(60, -30),
        textcoords="offset points",
        arrowprops={"arrowstyle": "->"},
    )
    ax.set(
        xscale="log", xlabel="k", ylabel="Σ_{i≤k} σ_i² / Σ_j σ_j²", title="Explained variance of fc1", ylim=(0, 1.02)
    )

    ax = axes[2]
    for r in runs:
        color = None
        for variant, ls in zip(FINETUNE_PARAMS, ("-", "--"), strict=True):
            xs = [0.5 * 64] + [f["samples"] for f in r["finetune"][variant]]
            ys = [r["compressed_accuracy"]] + [f["accuracy"] for f in r["finetune"][variant]]
            label = f"seed {r['seed']}: {variant}" if r is runs[0] or variant == "factors+biases" else None
            line = ax.plot(xs, ys, marker="o", ls=ls, ms=2.5, lw=1, alpha=0.8, color=color, label=label)
            color = line[0].get_color()
        ax.axhline(r["dense_accuracy"], color=color, ls=":", lw=0.8)
    ax.axhline(SOURCE["dense_accuracy"], color="k", ls="--", lw=1, label="post: dense 0.9616")
    ax.axhline(SOURCE["compressed_accuracy"], color="gray", ls="--", lw=1, label="post: k=10 0.9149")
    ax.plot([], [], color="gray", ls=":", lw=0.8, label="ours: dense, per seed")
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="fine-tune samples N (leftmost point: none; 60,000 = one epoch)",
        ylabel="test accuracy",
        title=f"Fine-tuning the k = {rank} model",
        ylim=(min(r["compressed_accuracy"] for r in runs) - 0.01, None),
    )
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The BENCHMARKS.md fragment: protocol, ours beside the post, and why they differ."""
    s, st, runs = results["summary"], results["storage"], results["runs"]
    rank, m = results["protocol"]["rank"], results["machine"]
    n_seeds = len(runs)

    def pm(d: dict, digits: int = 4) -> str:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if n_seeds > 1 else f"{d['mean']:.{digits}f}"

    max_n = max(f["samples"] for f in runs[0]["finetune"]["all"])
    n_train = results["protocol"]["train_images"]

    def reached(variant: str) -> str:
        ns = s["finetune_samples_to_dense"][variant]
        return ", ".join(f"not within {max_n // n_train} epochs" if n is None else f"{n:,}" for n in ns)

    last = [r["finetune"][v][-1]["accuracy"] - r["dense_accuracy"] for r in runs for v in FINETUNE_PARAMS]
    one_epoch = max(
        f["accuracy"] - r["dense_accuracy"] for r in runs for v in FINETUNE_PARAMS for f in r["finetune"][v]
        if f["samples"] == n_train
    )  # fmt: skip

    def best(variant: str) -> str:
        accs = [r["finetune"][variant][-1]["accuracy"] for r in runs]
        return pm({"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})

    lines = [
        f'## MNIST: "{SOURCE["title"]}" (blog post)',
        "",
        f"Source: <{SOURCE['url']}>. SimpleNN 784→500→10, inputs in [0, 1] (no normalization, as the post's "
        "`ToTensor()`), Adam lr 1e-3, batch 64, one epoch on the "
        f"{results['protocol']['train_images']:,} training images, accuracy on the "
        f"{results['protocol']['test_images']:,} test images; "
        f'then `compress(model, rank={rank}, include=["fc1"])`. '
        f"Seeds {', '.join(str(r['seed']) for r in runs)} (mean ± sample std over seeds).",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
        f"{m['device']}; date {m['date']}; wall time {results['wall_seconds']:.0f} s.",
        "",
        "| | post | ours |",
        "| --- | --- | --- |",
        f"| test accuracy, dense | {SOURCE['dense_accuracy']:.4f} | {pm(s['dense_accuracy'])} |",
        f"| test accuracy, fc1 at k = {rank} | {SOURCE['compressed_accuracy']:.4f} | {pm(s['compressed_accuracy'])} |",
        f"| accuracy drop | {SOURCE['dense_accuracy'] - SOURCE['compressed_accuracy']:.4f} | "
        f"{s['dense_accuracy']['mean'] - s['compressed_accuracy']['mean']:.4f} |",
        f"| fc1 explained variance at k = {rank} | not stated | {pm(s['explained_variance_at_rank'], 3)} |",
        f"| same, fc1 at its random initialisation | not stated | {pm(s['init_explained_variance_at_rank'], 3)} |",
        f"| fc1 relative Frobenius error | not stated | {pm(s['rel_error'], 3)} |",
        f"| fc1 values, dense | {SOURCE['fc1_values_dense']:,} | {st['dense']:,} |",
        f"| fc1 values, U_k + S_k (k×k) + V_k | {SOURCE['fc1_values_compressed']:,} (3.30%) | "
        f"{st['usv_kxk']:,} ({st['usv_kxk_fraction']:.2%}) |",
        f"| fc1 values, svdlora's two factors k·(m+n) | n/a | {st['two_factors']:,} "
        f"({st['two_factors_fraction']:.2%}) |",
        f"| fine-tune samples to reach the dense accuracy, factors + biases (per seed) | not done | "
        f"{reached('factors+biases')} |",
        f"| same, every parameter trained (per seed) | not done | {reached('all')} |",
        f"| test accuracy after {max_n:,} fine-tune samples: factors + biases / all | not done | "
        f"{best('factors+biases')} / {best('all')} |",
        "",
        f"![fc1 spectrum, explained variance and fine-tuning]({NAME}.png)",
        "",
        "The post's own figures (scree plot and explained-variance curve of fc1) are at the address above; ours "
        "are the first two panels, drawn the same way for seed " + str(runs[0]["seed"]) + ".",
        "",
        "Per-seed numbers:",
        "",
        "| seed | dense | k = " + str(rank) + " | rel. error | k for 90 / 95 / 99 % variance | "
        "fine-tune (factors + biases): accuracy after N = 64 / 1,024 / 16,384 / one epoch | "
        f"last fine-tune ({max_n:,}) minus dense: factors + biases / all |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        by_n = {f["samples"]: f["accuracy"] for f in r["finetune"]["factors+biases"]}
        ft = " / ".join(f"{by_n[n]:.4f}" if n in by_n else "–" for n in (64, 1024, 16384, n_train))
        kv = r["rank_for_explained_variance"]
        margin = " / ".join(f"{r['finetune'][v][-1]['accuracy'] - r['dense_accuracy']:+.4f}" for v in FINETUNE_PARAMS)
        lines.append(
            f"| {r['seed']} | {r['dense_accuracy']:.4f} | {r['compressed_accuracy']:.4f} | {r['rel_error']:.3f} | "
            f"{kv['0.9']} / {kv['0.95']} / {kv['0.99']} | {ft} | {margin} |"
        )
    sweep = runs[0]["rank_sweep_accuracy"]
    lines += [
        "",
        f"Accuracy against k for fc1 (seed {runs[0]['seed']}, no fine-tuning): "
        + ", ".join(f"k={k}: {sweep[k]:.4f}" for k in sorted(sweep, key=int))
        + ".",
        "",
        "Differences:",
        "",
        "- Storage: the post counts S_k as a full k×k matrix (10·500 + 10·10 + 10·784 = 12,940); svdlora stores "
        "√S folded into two factors, k·(m+n) = " + f"{st['two_factors']:,}" + " values (biases unchanged and "
        "not counted by either).",
        "- Accuracies: one epoch of training leaves run-to-run spread, and the post reports a single run with "
        "an unstated seed and a different data-loading order, so agreement is expected only to within that "
        "spread; the table gives our spread over seeds.",
        "- Spectrum: one epoch moves fc1 far from its random initialisation W₀ (‖W − W₀‖_F/‖W₀‖_F = "
        f"{pm(s['fc1_change_from_init'], 3)}) and concentrates its energy: the top {rank} directions hold "
        f"{pm(s['init_explained_variance_at_rank'], 3)} of it at init and {pm(s['explained_variance_at_rank'], 3)} "
        f"after training, the rest stays spread over a broad bulk (99% needs "
        f"{runs[0]['rank_for_explained_variance']['0.99']} of 500 directions). Hence k = {rank} keeps most of "
        f"the accuracy while its relative Frobenius error is {pm(s['rel_error'], 2)}.",
        "- Fine-tuning is our addition (the post stops at the truncated model). Every N starts from the same "
        "compressed model and sees the first N samples of a seeded stream of shuffled epochs (Adam lr 1e-3, "
        "batch 64, as in training); solid lines train fc1's two factors and both biases (fc2's weight frozen), "
        "dashed lines every parameter. The target is the dense model's accuracy after its single epoch. "
        f"After {max_n // n_train} epochs the fine-tuned models end {min(last):+.4f} to {max(last):+.4f} from it "
        f"(per-seed table); after one epoch at best {one_epoch:+.4f}. Two runs of this script with the same "
        "seeds, before and after an unrelated code change, gave fine-tune accuracies up to 0.0008 apart (float "
        "rounding in CPU kernels; repeats within one process are bit-identical), so which seeds cross the "
        "line at the last point is not a stable result; the size of the gap is.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m benchmarks.mnist_blog --data ../shared/data/mnist --seeds 0,1,2",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_MNIST,
        help="folder with the four MNIST *-idx?-ubyte.gz files (default: %(default)s)",
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=10, help="rank kept in fc1 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="default: %(default)s")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1,000 train / 500 test images, one seed, fine-tune up to one epoch",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("svdlora").setLevel(logging.WARNING)  # one line per compress() call is noise here
    torch.set_num_threads(args.threads)

    limit_train, limit_test = (1000, 500) if args.quick else (None, None)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    x_train, y_train = load_mnist(args.data, "train", limit_train)
    x_test, y_test = load_mnist(args.data, "test", limit_test)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    runs = []
    with stopwatch() as wall:
        for seed in seeds:
            runs.append(run_seed(seed, data, args.rank, finetune_epochs=1 if args.quick else 4))
            r = runs[-1]
            logger.info(
                "seed %d: dense %.4f, k=%d %.4f, fine-tune to dense after %s samples",
                seed,
                r["dense_accuracy"],
                args.rank,
                r["compressed_accuracy"],
                r["finetune_samples_to_dense"],
            )
    name = f"{NAME}_quick" if args.quick else NAME
    results = {
        "command": "python -m benchmarks.mnist_blog " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": {
            "rank": args.rank,
            "train_images": len(x_train),
            "test_images": len(x_test),
            "epochs": 1,
            "batch_size": 64,
            "optimizer": "Adam lr 1e-3",
            "inputs": "[0, 1], not normalized",
            "finetune": "each N from the same compressed model; Adam lr 1e-3, batch 64, the first N samples of a "
            "seeded stream of shuffled epochs; variants: 'factors+biases' trains fc1.A, fc1.B, fc1.bias, fc2.bias "
            "(fc2.weight frozen), 'all' trains every parameter",
        },
        "source": SOURCE,
        "storage": storage(args.rank),
        "runs": runs,
        "summary": summarize(runs),
        "wall_seconds": wall(),
        "machine": machine_info(),
    }
    write_results(name, results, args.results_dir)
    plot(results, args.results_dir / f"{name}.png")
    (args.results_dir / f"{name}.md").write_text(markdown(results).replace(f"({NAME}.png)", f"({name}.png)"))
    return results


if __name__ == "__main__":
    main()
