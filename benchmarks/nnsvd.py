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


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.nnsvd_report import markdown, plot  # the report module imports this one

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
