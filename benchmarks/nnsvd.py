"""Reproduce "Neural Network Compression via Low-Rank Factorization" (NN-SVD) on MNIST.

Source: the paper's code and run logs, github.com/jaketae/nn-svd. Protocol: 784→64→64→10 MLP,
ReLU, dropout 0.5 after each hidden layer, inputs in [0, 1]; a fixed 55,000/5,000 split of the
60,000 training images (the 5,000 are the held-out set), plus the official 10,000 test images;
10 epochs, batch 512, Adam lr 1e-3. Experiments:

1. Rank sweep k ∈ {1, 2, 4, 8, 16, 31}: (a) NN-SVD, one full-rank training then
   ``svdlora.compress(model, rank=k)`` on every layer, no retraining; (b) low-rank training from
   scratch (``svdlora.training.rank_constrained``); (c) the same with ``W = AᵀA`` on the square
   64×64 layer and a plain rank-k product on the non-square ones, as the paper's code does.
   k = 31, not 32: rank-32 factors of a 64×64 matrix hold as many values as the matrix, so
   svdlora (and the paper's code, whose logs stop at 31) leave it dense. The 64→10 output
   layer is factorized only for k < 10 (above, the factors would be larger than the matrix).
2. Double soft orthogonality (``svdlora.training.dso_penalty``) at k = 8, α ∈ {1e-2, 1e-3, 1e-4},
   with and without the symmetric layer.
3. Proposition 3's bound next to the measured output error, one layer compressed at a time.

Two deliberate differences from the paper's code, both measured so they can be compared:
its network calls ``F.dropout`` without ``training=self.training``, so dropout stays on when it
evaluates (we evaluate with dropout off, and also "the paper's way": dropout on, seeded); and it
factorizes only the two hidden layers (we factorize every layer; the ``hidden`` scope repeats
the k < 10 runs with the output layer dense).

Usage:
    python -m benchmarks.nnsvd --data ../shared/data/mnist
    python -m benchmarks.nnsvd --quick           # seconds: small slices, one epoch, one seed
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
from svdlora.compress import count_parameters
from svdlora.training import dso_penalty, rank_constrained

logger = logging.getLogger(__name__)

NAME = "nnsvd"
RANKS = (1, 2, 4, 8, 16, 31)
ALPHAS = (1e-2, 1e-3, 1e-4)
DSO_RANK = 8
EPOCHS, BATCH_SIZE, LR = 10, 512, 1e-3
SPLIT_SEED = 0  # the 55,000/5,000 split is the same for every training seed
EVAL_DROPOUT_SEED = 1234  # dropout masks of the "paper's way" evaluation
LAYERS = ("fc1", "fc2", "fc3")
SCOPES = {"all": None, "hidden": ["fc3"]}  # exclude patterns: "hidden" is the paper's code
METHODS = ("nnsvd", "lowrank", "symmetric")
LABELS = {"nnsvd": "NN-SVD (compress, no retraining)", "lowrank": "low-rank training", "symmetric": "symmetric W=AᵀA"}

# test_acc of the paper's published runs (metrics.csv under logs/ and src/logs/ of the repository):
# the official 10,000 test images, evaluated with dropout on, output layer dense, one run each.
SOURCE = {
    "code": "https://github.com/jaketae/nn-svd",
    "full_rank": 0.9049,
    "nnsvd": {1: 0.1987, 2: 0.3594, 4: 0.4679, 8: 0.7732, 16: 0.8818, 31: 0.8971},
    "lowrank": {1: 0.4198, 2: 0.6585, 4: 0.8194, 8: 0.8719, 16: 0.8882, 31: 0.9013},
    "symmetric": {1: 0.3493, 2: 0.6180, 4: 0.8022, 8: 0.8725, 16: 0.8885, 31: 0.8951},
    "dso": {
        "lowrank": {1e-2: 0.8238, 1e-3: 0.8592, 1e-4: 0.8685},
        "symmetric": {1e-2: 0.8218, 1e-3: 0.8541, 1e-4: 0.8702},
    },
}


class MLP(nn.Module):
    """784 → 64 → 64 → 10, ReLU, dropout after each hidden layer (off in eval mode)."""

    def __init__(self, hidden: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)

    @torch.no_grad()
    def layer_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input each of fc1, fc2, fc3 receives in eval mode (dropout is the identity)."""
        h1 = F.relu(self.fc1(x))
        return [x, h1, F.relu(self.fc2(h1))]


def load_data(root: Path, quick: bool) -> dict:
    """Train/held-out split of the 60k training images (fixed seed) and the official test set."""
    x, y = load_mnist(root, "train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held = order[:55_000], order[55_000:]
    x_test, y_test = load_mnist(root, "test")
    if quick:
        train, held, x_test, y_test = train[:2000], held[:500], x_test[:1000], y_test[:1000]
    return {
        "x_train": x[train], "y_train": y[train], "x_held": x[held], "y_held": y[held],
        "x_test": x_test, "y_test": y_test,
    }  # fmt: skip


def build(method: str, rank: int | None, seed: int, scope: str = "all") -> nn.Module:
    """A fresh MLP, rank-constrained for the trained low-rank methods."""
    torch.manual_seed(seed)
    model = MLP()
    if method in ("lowrank", "symmetric"):
        rank_constrained(model, rank, symmetric=method == "symmetric", exclude=SCOPES[scope])
    return model


def train(model: nn.Module, data: dict, seed: int, epochs: int, alpha: float = 0.0) -> list[float]:
    """Adam on cross-entropy (+ α·DSO); returns the held-out accuracy after each epoch."""
    torch.manual_seed(seed)  # dropout masks
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = data["x_train"], data["y_train"]
    curve = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=shuffle)
        for i in range(0, len(x), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if alpha:
                loss = loss + alpha * dso_penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(accuracy(model, data["x_held"], data["y_held"]))
    return curve


@torch.no_grad()
def evaluate(model: nn.Module, data: dict) -> dict:
    """Held-out and test accuracy (dropout off), and test accuracy the paper's way (dropout on)."""
    result = {
        "heldout": accuracy(model, data["x_held"], data["y_held"]),
        "test": accuracy(model, data["x_test"], data["y_test"]),
        "params": count_parameters(model),
    }
    torch.manual_seed(EVAL_DROPOUT_SEED)
    model.train()
    pred = model(data["x_test"]).argmax(1)
    model.eval()
    result["test_dropout_on"] = (pred == data["y_test"]).float().mean().item()
    return result


def bound_rows(full: MLP, data: dict, seed: int, ranks: tuple[int, ...]) -> list[dict]:
    """Proposition 3 against the measured error, compressing one layer i at a time to rank k.

    ‖f(x) − f′(x)‖ ≤ ε · L^(N−i) · ‖y‖ · Π_{j≥i} ‖W_j‖_F, with N = 3 layers, ε = ‖W_i − W_i′‖_F/‖W_i‖_F
    (svdlora's report), L = 1 (ReLU), y = the input layer i receives (x for i = 1), the product
    over layer i and every later layer of the trained weights, f the eval-mode network
    (dropout off) and f′ the same with W_i replaced. Proof sketch: biases cancel,
    ‖(W_i − W_i′)y‖ ≤ ‖W_i − W_i′‖_F ‖y‖, then each later ReLU is 1-Lipschitz and each later
    W_j at most ‖W_j‖_2 ≤ ‖W_j‖_F. "spectral" is the same chain with ‖W_i − W_i′‖_2 and
    ‖W_j‖_2, a tighter bound of the same form, to show where the slack comes from.
    """
    full.eval()
    x = data["x_test"]
    inputs = full.layer_inputs(x)
    with torch.no_grad():
        reference = full(x)
        weights = [getattr(full, name).weight.double() for name in LAYERS]
    frob = [torch.linalg.matrix_norm(w).item() for w in weights]
    spec = [torch.linalg.matrix_norm(w, ord=2).item() for w in weights]
    rows = []
    for i, name in enumerate(LAYERS, start=1):
        y_norm = inputs[i - 1].double().norm(dim=1)
        for k in ranks:
            model = copy.deepcopy(full)
            report = compress(model, rank=k, include=[name], progress=False)
            if not report.factorized:  # rank-k factors would not be smaller: nothing to bound
                continue
            eps = report.factorized[0].rel_error
            with torch.no_grad():
                measured = (model(x) - reference).double().norm(dim=1)
                delta = weights[i - 1] - getattr(model, name).dense_weight().double()
            lipschitz = 1.0 ** (len(LAYERS) - i)
            bound = eps * lipschitz * y_norm * torch.tensor(frob[i - 1 :]).prod()
            spectral = torch.linalg.matrix_norm(delta, ord=2).item() * y_norm * torch.tensor(spec[i:]).prod()
            ratio = measured / bound
            rows.append({
                "seed": seed, "layer": name, "i": i, "rank": k, "epsilon": eps,
                "frobenius_norms": frob, "mean_input_norm": y_norm.mean().item(),
                "measured_mean": measured.mean().item(), "measured_max": measured.max().item(),
                "bound_mean": bound.mean().item(), "spectral_bound_mean": spectral.mean().item(),
                "ratio_median": ratio.median().item(), "ratio_max": ratio.max().item(),
                "holds_fraction": (measured <= bound * (1 + 1e-9)).double().mean().item(),
            })  # fmt: skip
    return rows


def run_seed(seed: int, data: dict, epochs: int, ranks: tuple[int, ...], alphas: tuple[float, ...]) -> dict:
    """Every experiment for one training seed."""
    runs = []

    def record(method: str, scope: str, rank: int | None, alpha: float, model: nn.Module, curve, seconds):
        runs.append({"seed": seed, "method": method, "scope": scope, "rank": rank, "alpha": alpha,
                     **evaluate(model, data), "curve": curve, "seconds": seconds})  # fmt: skip
        r = runs[-1]
        logger.info("seed %d %-9s %-6s k=%-4s α=%-6g held-out %.4f test %.4f (dropout on %.4f)",
                    seed, method, scope, rank, alpha, r["heldout"], r["test"], r["test_dropout_on"])  # fmt: skip

    full = build("full", None, seed)
    with stopwatch() as t:
        curve = train(full, data, seed, epochs)
    record("full", "all", None, 0.0, full, curve, t())

    for k in ranks:
        for scope in SCOPES:
            if scope == "hidden" and k >= 10:  # the output layer stays dense anyway: same run as "all"
                continue
            compressed = copy.deepcopy(full)
            with stopwatch() as t:
                report = compress(compressed, rank=k, exclude=SCOPES[scope], progress=False)
            record("nnsvd", scope, k, 0.0, compressed, None, t())
            runs[-1]["rel_errors"] = {m.name: m.rel_error for m in report.factorized}
            for method in ("lowrank", "symmetric"):
                model = build(method, k, seed, scope)
                with stopwatch() as t:
                    curve = train(model, data, seed, epochs)
                record(method, scope, k, 0.0, model, curve, t())

    for method in ("lowrank", "symmetric"):
        for alpha in alphas:
            model = build(method, DSO_RANK, seed)
            with stopwatch() as t:
                curve = train(model, data, seed, epochs, alpha=alpha)
            record(method, "all", DSO_RANK, alpha, model, curve, t())
    return {"runs": runs, "bound": bound_rows(full, data, seed, ranks)}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def summarize(runs: list[dict], bound: list[dict]) -> dict:
    """Mean ± std over seeds of every configuration, keyed "method/scope/k/alpha"."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['method']}/{r['scope']}/{r['rank']}/{r['alpha']:g}", []).append(r)
    table = {}
    for key, rs in groups.items():
        table[key] = {m: _mean_std([r[m] for r in rs]) for m in ("heldout", "test", "test_dropout_on")}
        table[key]["params"] = rs[0]["params"]
        curves = [r["curve"] for r in rs if r["curve"]]
        if curves:
            table[key]["curve_mean"] = [statistics.fmean(c) for c in zip(*curves, strict=True)]
    bounds: dict[str, list[dict]] = {}
    for b in bound:
        bounds.setdefault(f"{b['layer']}/{b['rank']}", []).append(b)
    bound_table = {
        key: {
            "epsilon": _mean_std([b["epsilon"] for b in bs]),
            "measured_mean": _mean_std([b["measured_mean"] for b in bs]),
            "bound_mean": _mean_std([b["bound_mean"] for b in bs]),
            "spectral_bound_mean": _mean_std([b["spectral_bound_mean"] for b in bs]),
            "ratio_max": max(b["ratio_max"] for b in bs),
            "holds_fraction": min(b["holds_fraction"] for b in bs),
        }
        for key, bs in bounds.items()
    }
    return {"configs": table, "bound": bound_table}


def cell(summary: dict, method: str, k: int | None, scope: str = "all", alpha: float = 0.0) -> dict | None:
    """A summary entry; the "hidden" scope falls back to "all" where both are the same run (k ≥ 10)."""
    configs = summary["configs"]
    key = f"{method}/{scope}/{k}/{alpha:g}"
    if key not in configs and scope == "hidden":
        key = f"{method}/all/{k}/{alpha:g}"
    return configs.get(key)


def plot(results: dict, results_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, ranks = results["summary"], results["protocol"]["ranks"]
    colors = {"nnsvd": "tab:blue", "lowrank": "tab:orange", "symmetric": "tab:green"}
    full = cell(s, "full", None)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    ax = axes[0]
    for method in METHODS:
        for scope, ls in (("all", "-"), ("hidden", "--")):
            pts = [(k, c["heldout"]) for k in ranks if (c := cell(s, method, k, scope))]
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                        color=colors[method], ls=ls, marker="o", ms=4, capsize=2,
                        label=LABELS[method] + ("" if scope == "all" else ", output layer dense"))  # fmt: skip
    ax.axhline(full["heldout"]["mean"], color="k", lw=1, label=f"full rank {full['heldout']['mean']:.4f}")
    ax.set(title="Ours: 5,000 held-out images, dropout off", xlabel="rank k", ylabel="accuracy")
    ax = axes[1]
    for method in METHODS:
        theirs = SOURCE[method]
        ax.plot(list(theirs), list(theirs.values()), color=colors[method], marker="s", mfc="none", ls=":",
                label=f"paper: {LABELS[method]}")  # fmt: skip
        pts = [(k, c["test_dropout_on"]) for k in ranks if (c := cell(s, method, k, "hidden"))]
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                    color=colors[method], ls="--", marker="o", ms=4, capsize=2,
                    label=f"ours: {LABELS[method]}")  # fmt: skip
    ax.axhline(SOURCE["full_rank"], color="k", ls=":", lw=1, label=f"paper: full rank {SOURCE['full_rank']:.4f}")
    ax.axhline(full["test_dropout_on"]["mean"], color="k", lw=1,
               label=f"ours: full rank {full['test_dropout_on']['mean']:.4f}")  # fmt: skip
    ax.set(title="The paper's way: 10,000 test images, dropout on, output layer dense", xlabel="rank k")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(results_dir / f"{name}_rank_sweep.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    alphas = [0.0] + sorted(results["protocol"]["alphas"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, method in zip(axes[:2], ("lowrank", "symmetric"), strict=True):
        for alpha in alphas:
            c = cell(s, method, DSO_RANK, "all", alpha)
            if c:
                epochs = range(1, len(c["curve_mean"]) + 1)
                ax.plot(epochs, c["curve_mean"], marker="o", ms=3, label=f"α = {alpha:g}")
        ax.set(title=f"Ours: {LABELS[method]}, k = {DSO_RANK}", xlabel="epoch",
               ylabel="held-out accuracy (mean over seeds)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    xs = range(len(alphas))
    for offset, method in ((-0.1, "lowrank"), (0.1, "symmetric")):
        cs = [cell(s, method, DSO_RANK, "all", a) for a in alphas]
        ax.errorbar([x + offset for x in xs], [c["test"]["mean"] for c in cs], yerr=[c["test"]["std"] for c in cs],
                    color=colors[method], marker="o", ls="-", capsize=2,
                    label=f"ours (dropout off): {method}")  # fmt: skip
        ax.errorbar([x + offset for x in xs], [c["test_dropout_on"]["mean"] for c in cs],
                    yerr=[c["test_dropout_on"]["std"] for c in cs], color=colors[method], marker="^", ls="--",
                    capsize=2, label=f"ours (dropout on): {method}")  # fmt: skip
        theirs = [SOURCE[method][DSO_RANK] if a == 0 else SOURCE["dso"][method][a] for a in alphas]
        ax.plot([x + offset for x in xs], theirs, color=colors[method], marker="s", mfc="none", ls=":",
                label=f"paper (dropout on): {method}")  # fmt: skip
    ax.set_xticks(list(xs), [f"{a:g}" for a in alphas])
    ax.set(title=f"10,000 test images after {results['protocol']['epochs']} epochs, k = {DSO_RANK}",
           xlabel="DSO strength α", ylabel="accuracy")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(results_dir / f"{name}_dso.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.8))
    for layer, color in zip(LAYERS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        rows = [(int(key.split("/")[1]), b) for key, b in s["bound"].items() if key.startswith(layer + "/")]
        rows.sort()
        ks = [k for k, _ in rows]
        ax.plot(ks, [b["measured_mean"]["mean"] for _, b in rows], "o-", color=color, label=f"{layer}: measured")
        ax.plot(ks, [b["bound_mean"]["mean"] for _, b in rows], "x--", color=color, label=f"{layer}: Prop. 3 bound")
        ax.plot(ks, [b["spectral_bound_mean"]["mean"] for _, b in rows], "+:", color=color,
                label=f"{layer}: spectral-norm bound")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set(title="Output error ‖f(x) − f′(x)‖, one layer at rank k (mean over test images)", xlabel="rank k",
           ylabel="logit-space error")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    paths.append(results_dir / f"{name}_bound.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _pm(c: dict | None, metric: str) -> str:
    if c is None:
        return "–"
    v = c[metric]
    return f"{v['mean']:.4f} ± {v['std']:.4f}" if v["n"] > 1 else f"{v['mean']:.4f}"


def markdown(results: dict) -> str:
    """The BENCHMARKS.md fragment: protocol, ours beside the paper's runs, and each difference."""
    s, p, m = results["summary"], results["protocol"], results["machine"]
    name, ranks = results["name"], p["ranks"]
    full = cell(s, "full", None)
    seeds = ", ".join(map(str, p["seeds"]))
    lines = [
        '## MNIST: "Neural Network Compression via Low-Rank Factorization" (NN-SVD)',
        "",
        f"Source: the paper's code and run logs, <{SOURCE['code']}>. MLP 784→64→64→10, ReLU, dropout 0.5, inputs "
        f"in [0, 1]; {p['train_images']:,} training / {p['heldout_images']:,} held-out images (a fixed split of "
        f"the 60,000, seed {SPLIT_SEED}) and the official {p['test_images']:,} test images; epochs: {p['epochs']}, "
        f"batch {BATCH_SIZE}, Adam lr {LR:g}. Seeds {seeds}: mean ± sample std over seeds. The paper's numbers "
        "are single runs read from its `metrics.csv` logs (official test set).",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
        f"{m['device']}; date {m['date']}; wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        "### Accuracy against rank (the paper's Figure 1)",
        "",
        f"![accuracy against rank]({name}_rank_sweep.png)",
        "",
        "Left: ours as we measure it. Right: the paper's logged runs redrawn (hollow squares, there is no copy "
        "of its figure here) next to ours evaluated the same way (dropout left on at test time, output layer "
        "dense).",
        "",
        "Ours, every layer factorized, dropout off at evaluation:",
        "",
        "| k | params | NN-SVD held-out | NN-SVD test | low-rank held-out | low-rank test | symmetric held-out "
        "| symmetric test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| full | {full['params']:,} | {_pm(full, 'heldout')} | {_pm(full, 'test')} | | | | |",
    ]
    for k in ranks:
        n, lr, sy = (cell(s, meth, k) for meth in METHODS)
        lines.append(
            f"| {k} | {n['params']:,} / {lr['params']:,} / {sy['params']:,} | {_pm(n, 'heldout')} | {_pm(n, 'test')} "
            f"| {_pm(lr, 'heldout')} | {_pm(lr, 'test')} | {_pm(sy, 'heldout')} | {_pm(sy, 'test')} |"
        )
    lines += [
        "",
        "(params: NN-SVD / low-rank / symmetric models, biases included.)",
        "",
        "The paper's way, official test set: dropout on at evaluation, output layer dense (ours / paper):",
        "",
        "| k | NN-SVD | low-rank | symmetric |",
        "| --- | --- | --- | --- |",
        f"| full | {_pm(full, 'test_dropout_on')} / {SOURCE['full_rank']:.4f} | | |",
    ]
    for k in ranks:
        cells = [f"{_pm(cell(s, meth, k, 'hidden'), 'test_dropout_on')} / {SOURCE[meth][k]:.4f}" for meth in METHODS]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")

    alphas = [0.0] + sorted(p["alphas"])
    lines += [
        "",
        f"### Double soft orthogonality at k = {DSO_RANK} (the paper's Figure 2)",
        "",
        f"![DSO comparison]({name}_dso.png)",
        "",
        "Official test set; ours with dropout off / ours with dropout on / paper (dropout on):",
        "",
        "| α | low-rank | symmetric |",
        "| --- | --- | --- |",
    ]
    for a in alphas:
        row = []
        for meth in ("lowrank", "symmetric"):
            c = cell(s, meth, DSO_RANK, "all", a)
            theirs = SOURCE[meth][DSO_RANK] if a == 0 else SOURCE["dso"][meth].get(a)
            row.append(f"{_pm(c, 'test')} / {_pm(c, 'test_dropout_on')} / "
                       + ("–" if theirs is None else f"{theirs:.4f}"))  # fmt: skip
        lines.append(f"| {a:g} | " + " | ".join(row) + " |")

    lines += [
        "",
        "### Proposition 3: bound against measured output error",
        "",
        f"![bound against measured error]({name}_bound.png)",
        "",
        "One layer i compressed to rank k, all others dense, official test set, eval mode. Bound = "
        "ε·L^(N−i)·‖y‖·Π_{j≥i}‖W_j‖_F with N = 3, L = 1 (ReLU), ε = svdlora's relative Frobenius error of "
        "layer i, y = the input of layer i in the dense network (the image for i = 1) and the product over "
        "layer i and all later trained weight matrices; compared per image with ‖f(x) − f′(x)‖ on the logits. "
        "The spectral-norm column replaces ‖W_i − W_i′‖_F and ‖W_j‖_F by spectral norms (same chain, "
        "tighter).",
        "",
        "| layer | k | ε | measured (mean) | bound (mean) | spectral bound (mean) | max measured/bound | holds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, b in s["bound"].items():
        layer, k = key.split("/")
        lines.append(
            f"| {layer} | {k} | {b['epsilon']['mean']:.3f} | {b['measured_mean']['mean']:.3g} | "
            f"{b['bound_mean']['mean']:.3g} | {b['spectral_bound_mean']['mean']:.3g} | {b['ratio_max']:.3g} | "
            f"{b['holds_fraction']:.0%} |"
        )
    lines += ["", "### Differences", ""] + [f"- {d}" for d in differences(results)]
    return "\n".join(lines) + "\n"


def differences(results: dict) -> list[str]:
    """One sentence per finding of the paper, with our numbers next to its."""
    s, ranks = results["summary"], results["protocol"]["ranks"]
    full = cell(s, "full", None)
    dropout_cost = full["test"]["mean"] - full["test_dropout_on"]["mean"]
    out = [
        "Evaluation: the paper's network calls `F.dropout` without `training=self.training`, so its logged "
        f"accuracies have dropout on at test time. Evaluated that way our full-rank model drops by "
        f"{dropout_cost:.4f} ({full['test']['mean']:.4f} → {full['test_dropout_on']['mean']:.4f}; paper "
        f"{SOURCE['full_rank']:.4f}), which is why the right-hand comparison re-evaluates ours its way.",
        "Scope: the paper's code never factorizes the 64→10 output layer; we do for k < 10 (left panel, solid) "
        "and also repeat those ranks with it dense (dashed), which is the configuration compared with the "
        "paper on the right.",
    ]
    small = [k for k in ranks if k <= 2]
    if small:
        ours = [cell(s, meth, k, "hidden")["test_dropout_on"]["mean"] for meth in METHODS for k in small]
        theirs = [SOURCE[meth][k] for meth in METHODS for k in small]
        out.append(
            f"Small k ({', '.join(map(str, small))}): the paper's runs span {min(theirs):.2f}–{max(theirs):.2f}; "
            f"ours evaluated its way span {min(ours):.2f}–{max(ours):.2f} (dropout off, every layer: "
            + ", ".join(f"{meth} k={k} {cell(s, meth, k)['test']['mean']:.2f}" for meth in METHODS for k in small)
            + ")."
        )
    if 16 in ranks:
        gaps = {meth: full["heldout"]["mean"] - cell(s, meth, 16)["heldout"]["mean"] for meth in METHODS}
        theirs = {meth: SOURCE["full_rank"] - SOURCE[meth][16] for meth in METHODS}
        out.append(
            "Parity at k = 16 (held-out, full rank minus method): "
            + ", ".join(f"{meth} {gap:+.4f}" for meth, gap in gaps.items())
            + "; the paper reports parity at k = 16 for all three, and its own logs show gaps of "
            + ", ".join(f"{meth} {gap:+.4f}" for meth, gap in theirs.items())
            + "."
        )
    for k in ranks:
        n, lr = cell(s, "nnsvd", k), cell(s, "lowrank", k)
        if n["heldout"]["mean"] >= lr["heldout"]["mean"] - max(n["heldout"]["std"], lr["heldout"]["std"], 0.002):
            out.append(
                f"NN-SVD (no retraining) first matches low-rank training within one std at k = {k} "
                f"({n['heldout']['mean']:.4f} vs {lr['heldout']['mean']:.4f}); the paper says by k = 16."
            )
            break
    else:
        out.append("NN-SVD never matches low-rank training within one std on this sweep; the paper says by k = 16.")
    diff = {k: cell(s, "symmetric", k)["heldout"]["mean"] - cell(s, "lowrank", k)["heldout"]["mean"] for k in ranks}
    noise = {k: max(cell(s, m, k)["heldout"]["std"] for m in ("symmetric", "lowrank")) for k in ranks}
    their_lag = [k for k in ranks if SOURCE["symmetric"][k] < SOURCE["lowrank"][k]]
    out.append(
        "Symmetric minus plain low-rank training (held-out mean): "
        + ", ".join(f"k={k} {d:+.4f}" + ("" if abs(d) > noise[k] else " (within one std)") for k, d in diff.items())
        + "; the paper says symmetric lags until k = 16, and in its logs it is below at k = "
        + ", ".join(map(str, their_lag))
        + "."
    )
    top, f = max(ranks), full["heldout"]["mean"]
    ahead = [k for k in ranks if cell(s, "nnsvd", k)["heldout"]["mean"] > cell(s, "lowrank", k)["heldout"]["mean"]]
    out.append(
        f"At k = {top}, low-rank training from scratch stays {f - cell(s, 'lowrank', top)['heldout']['mean']:.4f} "
        f"below the full-rank model (held-out) and NN-SVD {f - cell(s, 'nnsvd', top)['heldout']['mean']:.4f}; "
        "truncating the full-rank model beats training the factorized one for the same 10 epochs at k = "
        + (", ".join(map(str, ahead)) if ahead else "none")
        + "."
    )
    for meth in ("lowrank", "symmetric"):
        alphas = [0.0] + sorted(results["protocol"]["alphas"])
        accs = [cell(s, meth, DSO_RANK, "all", a)["heldout"]["mean"] for a in alphas]
        best = alphas[max(range(len(alphas)), key=lambda i: accs[i])]
        monotone = all(accs[i] >= accs[i + 1] for i in range(1, len(accs) - 1))
        out.append(
            f"DSO, {meth}: held-out "
            + ", ".join(f"α={a:g} {v:.4f}" for a, v in zip(alphas, accs, strict=True))
            + f"; best α = {best:g}; smaller α {'is' if monotone else 'is not'} strictly better among α > 0 "
            "(the paper: DSO does not help, smaller α strictly better)."
        )
    if s["bound"]:
        worst = max(b["ratio_max"] for b in s["bound"].values())
        slack = {layer: [b["bound_mean"]["mean"] / b["measured_mean"]["mean"] for key, b in s["bound"].items()
                         if key.startswith(layer + "/")] for layer in LAYERS}  # fmt: skip
        spectral = [b["spectral_bound_mean"]["mean"] / b["measured_mean"]["mean"] for b in s["bound"].values()]
        verdict = (
            f"held on every test image and configuration (largest per-image measured/bound ratio {worst:.3g})"
            if worst <= 1
            else f"was violated (largest per-image measured/bound ratio {worst:.3g})"
        )
        out.append(
            f"Proposition 3 {verdict}. Mean bound over mean measured error: "
            + ", ".join(f"{layer} {min(v):.3g}–{max(v):.3g}×" for layer, v in slack.items() if v)
            + f"; with spectral norms {min(spectral):.3g}–{max(spectral):.3g}×. Loosest for "
            + max((layer for layer in LAYERS if slack[layer]), key=lambda layer: max(slack[layer]))
            + ": the earlier the layer, the more Frobenius norms (each ≥ the spectral norm) the product multiplies."
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m benchmarks.nnsvd --data ../shared/data/mnist --seeds 0,1,2",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_MNIST,
                        help="folder with the four MNIST *-idx?-ubyte.gz files (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="default: %(default)s")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2,000/500/1,000 images, 1 epoch, k = 8 and 16, one α, one seed")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("svdlora").setLevel(logging.WARNING)  # one line per compress() call is noise here
    torch.set_num_threads(args.threads)

    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    epochs, ranks, alphas = (1, (8, 16), (1e-3,)) if args.quick else (EPOCHS, RANKS, ALPHAS)
    data = load_data(args.data, args.quick)
    runs, bound = [], []
    with stopwatch() as wall:
        for seed in seeds:
            out = run_seed(seed, data, epochs, ranks, alphas)
            runs += out["runs"]
            bound += out["bound"]
    name = f"{NAME}_quick" if args.quick else NAME
    results = {
        "name": name,
        "command": "python -m benchmarks.nnsvd " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": {
            "seeds": seeds,
            "epochs": epochs,
            "ranks": list(ranks),
            "alphas": list(alphas),
            "dso_rank": DSO_RANK,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "split_seed": SPLIT_SEED,
            "eval_dropout_seed": EVAL_DROPOUT_SEED,
            "train_images": len(data["x_train"]),
            "heldout_images": len(data["x_held"]),
            "test_images": len(data["x_test"]),
            "inputs": "[0, 1], not normalized",
        },  # fmt: skip
        "source": {**SOURCE, "note": "test_acc from the repository's metrics.csv run logs; dropout on at test"},
        "runs": runs,
        "bound": bound,
        "summary": summarize(runs, bound),
        "wall_seconds": wall(),
        "machine": machine_info(),
    }
    write_results(name, results, args.results_dir)
    plot(results, args.results_dir, name)
    (args.results_dir / f"{name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
