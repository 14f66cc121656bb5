"""Train a small ViT on CIFAR-10 from scratch; the image benchmark model that gets compressed.

Config and why:
    * ``image_size=32, patch_size=4`` gives an 8x8 grid of 64 patches (+ CLS). Patch 4 is the
      usual choice for CIFAR-sized ViTs: patch 8 (16 tokens) measured ~3x faster per step on
      CPU, but ViTs with so few tokens are generally reported to plateau lower on CIFAR-10.
    * ``hidden_size=192, 6 layers, 3 heads (64 dims each), MLP 4x = 768``: a ViT-Tiny width at
      half its depth, 2.7M parameters. Measured on an idle 2-core CPU (AMX) it trains at
      ~220 img/s with 2 threads under bf16 autocast (~3.7 min per epoch; 177 img/s in float32);
      hidden 256 drops to ~170 img/s, so within a ~20-minute budget a wider or deeper model
      gets too few epochs to beat it. On a busy shared CPU expect far less (one thread next to
      other jobs gave ~70 img/s). Every block still has the four attention projections and
      two MLP matrices the compressor targets.
    * No dropout: with a few epochs the model is far from overfitting; augmentation (random
      crop with 4-pixel padding, horizontal flip) and label smoothing 0.1 regularise enough.
    * AdamW, peak lr 1e-3, weight decay 0.05, batch 128, linear warmup then cosine decay fitted
      to the time budget (see ``benchmarks.training``).

Output: ``<cache-dir>/vit-cifar10/`` (``save_pretrained`` model + ``ViTImageProcessor`` with no
resize and the CIFAR-10 mean/std) and ``train_log.json`` with the test accuracy on all 10,000
test images.

Example:
    python -m benchmarks.train_vit --time-budget-min 22
    python -m benchmarks.train_vit --quick --cache-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import training
from benchmarks.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATA, load_cifar10

logger = logging.getLogger(__name__)

NAME = "vit-cifar10"


def build_config(quick: bool = False):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=64 if quick else 192,
        num_hidden_layers=2 if quick else 6,
        num_attention_heads=2 if quick else 3,
        intermediate_size=256 if quick else 768,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label=dict(enumerate(CIFAR10_CLASSES)),
        label2id={c: i for i, c in enumerate(CIFAR10_CLASSES)},
    )


def build_model(quick: bool = False):
    from transformers import ViTForImageClassification

    return ViTForImageClassification(build_config(quick))


def build_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=False,
        size={"height": 32, "width": 32},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CIFAR10_MEAN),
        image_std=list(CIFAR10_STD),
    )


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> float, scaled and normalised exactly as the saved processor does."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched, on uint8 images."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 500) -> float:
    """Top-1 accuracy in float32."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size].to(device))
        correct += (model(pixel_values=x).logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python -m benchmarks.train_vit --time-budget-min 22",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA / "cifar10" / "cifar10-jpg.tar.gz",
        help="path to cifar10-jpg.tar.gz (default: %(default)s)",
    )
    training.add_common_args(parser, epochs=30, budget_min=22)
    args = parser.parse_args(argv)
    device = training.setup(args)
    out = training.output_dir(args, NAME)
    if not args.force and (log := training.finished_log(out)):
        logger.info("%s already trained (test accuracy %.4f); skipping", out, log["test_accuracy"])
        return log

    limit = 30 if args.quick else None
    x_train, y_train = load_cifar10(args.data, args.cache_dir, "train", limit)
    x_test, y_test = load_cifar10(args.data, args.cache_dir, "test", 10 if args.quick else None)
    bs = min(args.batch_size or (64 if args.quick else 128), len(x_train))
    steps_per_epoch = len(x_train) // bs  # drop the ragged last batch
    gen = torch.Generator().manual_seed(args.seed)

    def batches(epoch: int):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            yield normalize(augment(x_train[idx], gen).to(device)), y_train[idx].to(device)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(pixel_values=x).logits.float(), y, label_smoothing=0.1)

    model = build_model(args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("ViT with %.2fM parameters, %d train images, batch %d", n_params / 1e6, len(x_train), bs)
    cfg = training.FitConfig(
        epochs=2 if args.quick else args.epochs,
        lr=args.lr or 1e-3,
        weight_decay=0.05,
        warmup_steps=2 if args.quick else 300,
        time_budget_min=args.time_budget_min,
        amp=not args.no_amp,
    )
    summary = training.fit(
        model, batches, loss_fn, steps_per_epoch, cfg, device, desc="vit", progress=not args.no_progress
    )
    acc = evaluate(model, x_test, y_test, device)
    logger.info("test accuracy %.4f on %d images", acc, len(x_test))

    model.save_pretrained(out)
    build_processor().save_pretrained(out)
    log = {
        "model": NAME,
        "finished": True,
        "quick": args.quick,
        "parameters": n_params,
        "train_examples": len(x_train),
        "batch_size": bs,
        "augmentation": "random crop 32 from zero-padded 40 + horizontal flip",
        "label_smoothing": 0.1,
        "test_examples": len(x_test),
        "test_accuracy": round(acc, 4),
        "data": str(args.data),
        **summary,
    }
    training.write_log(out, log)
    logger.info("saved %s", out)
    return log


if __name__ == "__main__":
    main()
