"""Train a small Marian German->English translator on Multi30k; the seq2seq benchmark model.

Tokenizer: one joint SentencePiece-style Unigram model (``tokenizers`` library, NFKC,
Metaspace pre-tokenizer, 8,000 pieces) trained on the German and English training sides
together, as Marian's shared-vocabulary models do. Special tokens ``<pad>`` = 0, ``</s>`` = 1,
``<unk>`` = 2; every encoding ends with ``</s>``. Saved as a fast tokenizer that
``AutoTokenizer.from_pretrained(folder)`` loads back.

Model config and why:
    * ``d_model=256, 3 encoder + 3 decoder layers, 4 heads, FFN 1024``: the usual "small
      transformer" for Multi30k (29k short caption pairs, ~16 pieces a sentence); larger
      models gain little on this data and train fewer epochs in a CPU time budget.
      7.6M parameters, of which 2M are the shared embedding.
    * Shared encoder/decoder/output embeddings (``share_encoder_decoder_embeddings``, tied
      LM head), ``scale_embedding``, sinusoidal positions and ``decoder_start_token_id = pad``
      exactly as Marian does.
    * Dropout 0.1, label smoothing 0.1, AdamW (lr 1e-3, betas 0.9/0.98, weight decay 0.01),
      warmup then cosine decay fitted to the time budget; batches of sentences of similar
      length to waste little compute on padding.

Evaluation: beam search (``num_beams=4, max_new_tokens=64``) on test_2016_flickr (1,000
sentences), scored with sacrebleu ``corpus_bleu`` and ``corpus_chrf`` against the raw
references; the settings are stored in ``train_log.json`` and the saved generation config.

Example:
    python -m benchmarks.train_marian --time-budget-min 22
    python -m benchmarks.train_marian --quick --cache-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import training
from benchmarks.data import DEFAULT_DATA, read_lines, require

logger = logging.getLogger(__name__)

NAME = "marian-multi30k-de-en"
SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2
GENERATION = {"num_beams": 4, "max_new_tokens": 64}


def train_tokenizer(texts: list[str], vocab_size: int = 8000):
    """A joint Unigram tokenizer over ``texts``, wrapped for ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    # Marian appends </s> to both source and target sequences.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=128
    )


def build_config(vocab_size: int, quick: bool = False):
    from transformers import MarianConfig

    d, ffn, layers, heads = (64, 128, 1, 2) if quick else (256, 1024, 3, 4)
    return MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=128,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
    )


def build_model(vocab_size: int, quick: bool = False):
    from transformers import MarianMTModel

    model = MarianMTModel(build_config(vocab_size, quick))
    gc = model.generation_config
    gc.num_beams = GENERATION["num_beams"]
    gc.max_new_tokens = GENERATION["max_new_tokens"]
    gc.max_length = None
    gc.bad_words_ids = [[0]]  # never emit <pad>, as released Marian models do
    gc.decoder_start_token_id, gc.pad_token_id, gc.eos_token_id = 0, 0, 1
    return model


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices whose sentences have similar lengths."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    pool = batch_size * 50  # sort within pools so batches stay random across the epoch
    batches = []
    for p in range(0, len(idx), pool):
        chunk = sorted(idx[p : p + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], device, batch_size: int = 50, progress: bool = True) -> list[str]:
    from tqdm.auto import tqdm

    model.eval()
    out = []
    for i in tqdm(range(0, len(sources), batch_size), desc="beam search", disable=not progress, mininterval=5):
        enc = tokenizer(sources[i : i + batch_size], return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, **GENERATION)
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return [s.strip() for s in out]


def main(argv: list[str] | None = None) -> dict:
    m30k = DEFAULT_DATA / "multi30k"
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python -m benchmarks.train_marian --time-budget-min 22",
    )
    parser.add_argument("--train-src", type=Path, default=m30k / "train.de.gz", help="(default: %(default)s)")
    parser.add_argument("--train-tgt", type=Path, default=m30k / "train.en.gz", help="(default: %(default)s)")
    parser.add_argument("--test-src", type=Path, default=m30k / "test_2016_flickr.de.gz", help="(default: %(default)s)")
    parser.add_argument("--test-tgt", type=Path, default=m30k / "test_2016_flickr.en.gz", help="(default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer pieces (default: %(default)s)")
    training.add_common_args(parser, epochs=30, budget_min=22)
    args = parser.parse_args(argv)
    device = training.setup(args)
    out = training.output_dir(args, NAME)
    if not args.force and (log := training.finished_log(out)):
        logger.info("%s already trained (BLEU %.2f); skipping", out, log["bleu"])
        return log
    require({"--train-src": args.train_src, "--train-tgt": args.train_tgt,
             "--test-src": args.test_src, "--test-tgt": args.test_tgt})  # fmt: skip

    import sacrebleu

    src, tgt = read_lines(args.train_src), read_lines(args.train_tgt)
    test_src, test_tgt = read_lines(args.test_src), read_lines(args.test_tgt)
    if len(src) != len(tgt) or len(test_src) != len(test_tgt):
        raise ValueError(
            f"source and target line counts differ: {len(src)}/{len(tgt)}, {len(test_src)}/{len(test_tgt)}"
        )
    if args.quick:
        src, tgt, test_src, test_tgt = src[:200], tgt[:200], test_src[:8], test_tgt[:8]
    vocab = min(args.vocab_size, 500) if args.quick else args.vocab_size
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(src + tgt, vocab)
    logger.info("tokenizer: %d pieces in %.1f s", len(tokenizer), time.perf_counter() - t0)
    enc = tokenizer(src, text_target=tgt, truncation=True, max_length=128)
    xs, ys = enc["input_ids"], enc["labels"]

    bs = args.batch_size or (32 if args.quick else 128)
    lengths = [len(a) + len(b) for a, b in zip(xs, ys, strict=True)]
    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(xs) // bs)

    def batches(epoch: int):
        for b in length_batches(lengths, bs, rng):
            x = pad([xs[i] for i in b], 0)
            y = pad([ys[i] for i in b], -100)
            yield x.to(device), y.to(device)

    def loss_fn(model, batch):
        from transformers.models.marian.modeling_marian import shift_tokens_right

        x, y = batch
        dec_in = shift_tokens_right(y, 0, 0)  # teacher forcing: <pad> then the target shifted right
        logits = model(input_ids=x, attention_mask=(x != 0).long(), decoder_input_ids=dec_in).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=0.1)

    model = build_model(len(tokenizer), args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Marian with %.2fM parameters, %d pairs, batch %d", n_params / 1e6, len(xs), bs)
    cfg = training.FitConfig(
        epochs=2 if args.quick else args.epochs,
        lr=args.lr or 1e-3,
        weight_decay=0.01,
        betas=(0.9, 0.98),
        warmup_steps=2 if args.quick else 400,
        time_budget_min=args.time_budget_min,
        amp=not args.no_amp,
    )
    summary = training.fit(
        model, batches, loss_fn, steps_per_epoch, cfg, device, desc="marian", progress=not args.no_progress
    )

    t0 = time.perf_counter()
    hyps = translate(model, tokenizer, test_src, device, progress=not args.no_progress)
    eval_s = time.perf_counter() - t0
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu = bleu_metric.corpus_score(hyps, [test_tgt])  # same as sacrebleu.corpus_bleu
    chrf = chrf_metric.corpus_score(hyps, [test_tgt])
    logger.info("test %s | %s (%.0f s)", bleu, chrf, eval_s)

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "test_hypotheses.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    log = {
        "model": NAME,
        "finished": True,
        "quick": args.quick,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "train_pairs": len(xs),
        "batch_size": bs,
        "label_smoothing": 0.1,
        "test_sentences": len(test_src),
        "bleu": round(bleu.score, 2),
        "chrf": round(chrf.score, 2),
        "bleu_signature": str(bleu_metric.get_signature()),
        "chrf_signature": str(chrf_metric.get_signature()),
        "generation": {**GENERATION, "batch_size": 50, "dtype": "float32", "bad_words_ids": [[0]]},
        "eval_wall_s": round(eval_s, 1),
        "examples": [
            {"src": s, "ref": r, "hyp": h} for s, r, h in zip(test_src[:3], test_tgt[:3], hyps[:3], strict=True)
        ],
        "data": {k: str(getattr(args, k)) for k in ("train_src", "train_tgt", "test_src", "test_tgt")},
        **summary,
    }
    training.write_log(out, log)
    logger.info("saved %s", out)
    return log


if __name__ == "__main__":
    main()
