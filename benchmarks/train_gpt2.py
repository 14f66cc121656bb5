"""Train a small GPT-2 (Conv1D layers kept) on WikiText-2 valid + Tiny Shakespeare; the LM benchmark.

Data: the real GPT-2 byte-level BPE (50,257 tokens) from the ``gpt2-tokenizer`` folder.
Training text = WikiText-2 *validation* + the first 90% of Tiny Shakespeare (cut at a line
break); the last 10% of Shakespeare is held out and written to ``heldout.txt`` in the model
folder. Test perplexity is measured on WikiText-2 *test* and on the held-out Shakespeare, with
non-overlapping windows of ``n_positions`` tokens in float32.

Model config and why:
    * ``n_embd=256, n_layer=6, n_head=4 (64 dims each), n_positions=256``: with GPT-2's vocabulary
      the tied 50,257 x 256 embedding / LM head (12.9M parameters) dominates the compute, so six
      blocks (4.7M parameters) cost only ~20% more per step than four and give the compressor
      6 x 4 ``Conv1D`` matrices to work on. Head dim 64 as in GPT-2.
    * Context 256 tokens: enough for the text, cheap attention on CPU.
    * No dropout: the time budget covers about one epoch, far from overfitting.
    * AdamW, peak lr 1e-3, betas 0.9/0.95, weight decay 0.1, batches of 16 x 256 tokens, warmup
      then cosine decay fitted to the time budget (see ``benchmarks.training``).

Example:
    python -m benchmarks.train_gpt2 --time-budget-min 12
    python -m benchmarks.train_gpt2 --quick --cache-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch

from benchmarks import training
from benchmarks.data import DEFAULT_DATA, read_text, require

logger = logging.getLogger(__name__)

NAME = "gpt2-small-wt2"
HELDOUT = "heldout.txt"


def split_heldout(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """(first part, last ``fraction``), cut at the line break nearest the split point."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction))) + 1
    return text[:cut], text[cut:]


def build_model(vocab_size: int, eos_id: int, quick: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    d, layers, heads, ctx = (32, 2, 2, 64) if quick else (256, 6, 4, 256)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=ctx,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def blocks(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens (the ragged tail is dropped)."""
    n = len(ids) // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, device, batch_size: int = 16) -> tuple[float, int]:
    """exp(mean next-token loss) over non-overlapping windows, float32; returns (ppl, tokens scored)."""
    model.eval()
    windows = blocks(ids, length)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss  # mean over the (length - 1) predicted tokens
        n = x.shape[0] * (length - 1)
        nll, count = nll + loss.item() * n, count + n
    return math.exp(nll / count), count


def main(argv: list[str] | None = None) -> dict:
    text_dir = DEFAULT_DATA / "text"
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python -m benchmarks.train_gpt2 --time-budget-min 12",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=DEFAULT_DATA / "gpt2-tokenizer",
        help="folder with GPT-2's vocab.json and merges.txt (default: %(default)s)",
    )
    parser.add_argument(
        "--wikitext-train", type=Path, default=text_dir / "wikitext-2.valid.txt", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--wikitext-test", type=Path, default=text_dir / "wikitext-2.test.txt", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--shakespeare", type=Path, default=text_dir / "tinyshakespeare.txt", help="(default: %(default)s)"
    )
    training.add_common_args(parser, epochs=5, budget_min=12)
    args = parser.parse_args(argv)
    device = training.setup(args)
    out = training.output_dir(args, NAME)
    if not args.force and (log := training.finished_log(out)):
        logger.info("%s already trained (WikiText-2 test ppl %.1f); skipping", out, log["wikitext2_test_ppl"])
        return log
    require({"--tokenizer": args.tokenizer, "--wikitext-train": args.wikitext_train,
             "--wikitext-test": args.wikitext_test, "--shakespeare": args.shakespeare})  # fmt: skip

    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(args.tokenizer)
    wiki, wiki_test = read_text(args.wikitext_train), read_text(args.wikitext_test)
    shakes_train, heldout = split_heldout(read_text(args.shakespeare))
    if args.quick:
        wiki, wiki_test, shakes_train, heldout = wiki[:8000], wiki_test[:4000], shakes_train[:8000], heldout[:4000]
    out.mkdir(parents=True, exist_ok=True)
    (out / HELDOUT).write_text(heldout, encoding="utf-8")

    def encode(text: str) -> torch.Tensor:
        # The fast tokenizer warns above model_max_length; whole texts are windowed below.
        return torch.tensor(tokenizer(text, verbose=False)["input_ids"])

    eos = torch.tensor([tokenizer.eos_token_id])
    train_ids = torch.cat([encode(wiki), eos, encode(shakes_train), eos])
    model = build_model(len(tokenizer), tokenizer.eos_token_id, args.quick)
    ctx = model.config.n_positions
    train_windows = blocks(train_ids, ctx)
    bs = args.batch_size or (8 if args.quick else 16)
    steps_per_epoch = len(train_windows) // bs
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "GPT-2 with %.2fM parameters, %d training tokens (%d windows of %d), batch %d",
        n_params / 1e6,
        len(train_ids),
        len(train_windows),
        ctx,
        bs,
    )
    gen = torch.Generator().manual_seed(args.seed)

    def batches(epoch: int):
        # A fresh random offset each epoch so window boundaries move.
        shift = int(torch.randint(0, ctx, (1,), generator=gen)) if epoch else 0
        windows = blocks(train_ids[shift:], ctx)
        perm = torch.randperm(len(windows), generator=gen)
        for i in range(min(steps_per_epoch, len(windows) // bs)):
            yield windows[perm[i * bs : (i + 1) * bs]].to(device)

    def loss_fn(model, x):
        return model(input_ids=x, labels=x).loss

    cfg = training.FitConfig(
        epochs=2 if args.quick else args.epochs,
        lr=args.lr or 1e-3,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        warmup_steps=2 if args.quick else 100,
        time_budget_min=args.time_budget_min,
        amp=not args.no_amp,
    )
    summary = training.fit(
        model, batches, loss_fn, steps_per_epoch, cfg, device, desc="gpt2", progress=not args.no_progress
    )
    wiki_ppl, wiki_tokens = perplexity(model, encode(wiki_test), ctx, device)
    held_ppl, held_tokens = perplexity(model, encode(heldout), ctx, device)
    logger.info(
        "perplexity: WikiText-2 test %.2f (%d tokens), held-out Shakespeare %.2f (%d tokens)",
        wiki_ppl,
        wiki_tokens,
        held_ppl,
        held_tokens,
    )

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {
        "model": NAME,
        "finished": True,
        "quick": args.quick,
        "parameters": n_params,
        "train_tokens": len(train_ids),
        "context": ctx,
        "batch_size": bs,
        "wikitext2_test_ppl": round(wiki_ppl, 3),
        "wikitext2_test_tokens_scored": wiki_tokens,
        "heldout_ppl": round(held_ppl, 3),
        "heldout_tokens_scored": held_tokens,
        "heldout_file": HELDOUT,
        "eval": f"non-overlapping {ctx}-token windows, float32, ragged tail dropped",
        "data": {k: str(getattr(args, k)) for k in ("tokenizer", "wikitext_train", "wikitext_test", "shakespeare")},
        **summary,
    }
    training.write_log(out, log)
    logger.info("saved %s", out)
    return log


if __name__ == "__main__":
    main()
