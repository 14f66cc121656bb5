"""Section 4: the poster's two tables on translation, with a Marian model trained here on Multi30k de→en.

Trains (or loads) the model of ``benchmarks.train_marian``, then Table 1: submatrices 1..9 at budget
0.5, exact and randomized SVD; Table 2: budget 0.1..1.0 at 3 submatrices, exact SVD. BLEU and chrF
(sacrebleu defaults) and runtime with ``svdlora.evaluate`` on the first ``--limit`` sentences of
test_2016_flickr (default 300; beam 4, at most 64 new tokens, batch 50).

Usage:
    python -m benchmarks.translation
    python -m benchmarks.translation --limit 1000    # the whole test set
    python -m benchmarks.translation --quick         # seconds: a Marian trained for a few steps
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks import sweep, train_marian
from benchmarks.common import machine_info, stopwatch, write_results
from benchmarks.data import DEFAULT_DATA, read_lines
from benchmarks.sweep import Eval, compression_cells, markdown_table

logger = logging.getLogger(__name__)

NAME = "translation"
TABLE1_BUDGET = 0.5
TABLE2_SUBMATRICES = 3
NOT_GIVEN = "not given in the issue"


def settings(quick: bool) -> tuple[list, list]:
    subs, budgets = ((1, 2), (0.1, 1.0)) if quick else (sweep.SUBMATRICES, sweep.BUDGETS)
    return sweep.table1(TABLE1_BUDGET, subs), sweep.table2(budgets, TABLE2_SUBMATRICES)


def bleu(row: dict) -> float:
    return row["evals"]["test"]["metrics"]["bleu"]


def chrf(row: dict) -> float:
    return row["evals"]["test"]["metrics"]["chrf"]


def plot(results: dict, path: Path) -> Path:
    dense = results["dense"]
    fig, axes = sweep.figure(2, 2)
    for col, (get, label) in enumerate(((bleu, "BLEU"), (chrf, "chrF"))):
        sweep.plot_metric(axes[0][col], results["table1"], "submatrices", get, get(dense), label)
        axes[0][col].set_title(f"Table 1: budget {TABLE1_BUDGET}", fontsize=9)
        sweep.plot_metric(axes[1][col], results["table2"], "budget", get, get(dense), label)
        axes[1][col].set_title(f"Table 2: {TABLE2_SUBMATRICES} submatrices, exact SVD", fontsize=9)
    return sweep.save_figure(fig, path)


def output_lengths(folder: Path, sources: list[str], budgets: tuple, cache: Path, force: bool) -> dict:
    """How long the generated sentences are, dense and compressed: the cost of beam search follows it.

    Same generation settings as the evaluation (beam 4, at most 64 new tokens, batches of 50). A batch
    decodes until its longest hypothesis ends, so ``decode_steps`` (summed over batches) is what the time
    follows. Cached in ``cache``.
    """
    import copy

    import torch

    from svdlora import compress

    key = {"model": str(folder), "sentences": len(sources), "budgets": list(budgets)}
    if cache.is_file() and not force and (stored := json.loads(cache.read_text()))["key"] == key:
        return stored
    model, tok = sweep.load_dense(folder, "translation")
    out = {"key": key, "rows": []}
    for b in (None, *budgets):
        work = model if b is None else copy.deepcopy(model)
        if b is not None:
            compress(work, budget=b, submatrices=TABLE2_SUBMATRICES, progress=False)
        tokens, steps, capped = 0, 0, 0
        for i in range(0, len(sources), 50):
            enc = tok(sources[i : i + 50], return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = work.generate(**enc, num_beams=4, max_new_tokens=64)
            # Tokens up to and including the first </s>, after the decoder start token; finished beams are
            # padded with </s>, so counting non-pad tokens would be wrong.
            is_eos = gen[:, 1:] == work.generation_config.eos_token_id
            ended = is_eos.any(1)
            lengths = torch.where(
                ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, gen.shape[1] - 1, dtype=torch.long)
            )
            tokens, steps = tokens + int(lengths.sum()), steps + gen.shape[1] - 1
            capped += int((lengths >= 64).sum())  # at the cap, forced_eos_token_id puts </s> last
        out["rows"].append({"budget": b, "mean_tokens": tokens / len(sources), "decode_steps": steps,
                            "capped": capped})  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def _time(row: dict) -> float:
    return row["evals"]["test"]["model_time_s"]


def _runtime(row: dict) -> str:
    e = row["evals"]["test"]
    return f"{e['model_time_s']:.1f} s / {e['throughput']:.1f} sent/s"


def _lengths_sentence(lengths: dict | None) -> str:
    if not lengths:
        return ""
    parts = [
        f"{'dense' if r['budget'] is None else 'budget ' + format(r['budget'], 'g')}: {r['mean_tokens']:.1f} tokens "
        f"per sentence, {r['decode_steps']} decoding steps, {r['capped']} reaching the 64-token cap"
        for r in lengths["rows"]
    ]
    return (
        "Beam search decodes each batch until its longest hypothesis ends, so its time follows the output lengths, "
        f"measured on the same {lengths['key']['sentences']} sentences: " + "; ".join(parts) + ". "
    )


def markdown(results: dict, png: str) -> str:
    dense, t1, t2, m, log = (results[k] for k in ("dense", "table1", "table2", "machine", "train_log"))
    cfg = json.loads((Path(results["model"]) / "config.json").read_text())
    n_sent = results["sentences"]
    body1 = [["dense", f"{bleu(dense):.2f}", f"{chrf(dense):.2f}", "", "", NOT_GIVEN,
              *compression_cells(dense)[:1], "", _runtime(dense)]]  # fmt: skip
    for n in dict.fromkeys(r["setting"]["submatrices"] for r in t1):
        ex = sweep.select(t1, submatrices=n, svd_method="exact")
        rn = sweep.select(t1, submatrices=n, svd_method="randomized")
        cells = [n]
        for rows in (ex, rn):
            cells += [f"{bleu(rows[0]):.2f}", f"{chrf(rows[0]):.2f}"] if rows else ["", ""]
        body1.append([*cells, NOT_GIVEN, f"{(ex or rn)[0]['parameters']:,}",
                      " / ".join(f"{r[0]['rel_error_mean']:.4f}" for r in (ex, rn) if r),
                      _runtime((ex or rn)[0])])  # fmt: skip
    body2 = [["dense", *compression_cells(dense), f"{bleu(dense):.2f}", f"{chrf(dense):.2f}", NOT_GIVEN,
              _runtime(dense)]]  # fmt: skip
    for r in t2:
        body2.append([f"{r['setting']['budget']:g}", *compression_cells(r), f"{bleu(r):.2f}", f"{chrf(r):.2f}",
                      NOT_GIVEN, _runtime(r)])  # fmt: skip
    sig = dense["evals"]["test"]["metrics"]
    distinct = list({str(r["setting"]): r for r in t1 + t2}.values())
    slower = sum(_time(r) > _time(dense) for r in distinct)
    lines = [
        "## Translation: the poster's NMT tables on Multi30k German→English",
        "",
        f"Model: the MarianMT-architecture model that `python -m benchmarks.train_marian` trains here on the "
        f"{log['train_pairs']:,} Multi30k training pairs ({log['parameters']:,} parameters: d_model "
        f"{cfg['d_model']}, {cfg['encoder_layers']}+{cfg['decoder_layers']} layers, FFN {cfg['encoder_ffn_dim']}, "
        f"shared {log['vocab_size']:,}-piece vocabulary; reasons in that file's docstring); "
        f"{log['epochs_completed']} epochs in {log['train_wall_s'] / 60:.0f} min on this CPU. Its training log "
        f"gives BLEU {log['bleu']:.2f} / chrF {log['chrf']:.2f} on all {log['test_sentences']:,} sentences of "
        f"test_2016_flickr. Here every figure is on the first {n_sent} sentences (`--limit {n_sent}`; drop it for "
        "all 1,000), beam 4, at most 64 new tokens, batch 50, float32, with `svdlora.evaluate`; "
        f"`{sig['bleu_signature']}`, `{sig['chrf_signature']}`. Every encoder and decoder Linear is targeted; the "
        "LM head (tied to the shared embedding) stays dense.",
        "",
        f"Command: `{results['command']}`  ",
        sweep.machine_line(m)
        + f" Time spent measuring these {len({str(r['setting']) for r in t1 + t2})} settings and the dense "
        f"model: {results['measured_s'] / 60:.1f} min.",
        "",
        f"![BLEU and chrF against submatrices and budget]({png})",
        "",
        "The issue gives no figures for the poster's NMT experiment, so the poster columns read "
        f'"{NOT_GIVEN}"; every number here is ours.',
        "",
        sweep.runtime_note(sweep.select(t1, svd_method="exact"), "sentences/s"),
        "",
        f"### Table 1: submatrices at a fixed budget ({TABLE1_BUDGET})",
        "",
        sweep.EXACT_SVD_NOTE,
        "",
        markdown_table(
            [
                "submatrices",
                "BLEU, exact",
                "chrF, exact",
                "BLEU, randomized",
                "chrF, randomized",
                "poster",
                "parameters",
                "mean rel. error (exact / randomized)",
                "runtime, exact (model time / speed)",
            ],
            body1,
        ),  # fmt: skip
        "",
        sweep.table1_summary(t1, bleu, "BLEU", 2)
        + " (the model time of translation also follows the length of the generated sentences).",
        "",
        f"### Table 2: parameter budget ({TABLE2_SUBMATRICES} submatrices, exact SVD)",
        "",
        markdown_table(
            [
                "budget",
                "parameters",
                "factorized layers",
                "mean rel. error",
                "BLEU",
                "chrF",
                "poster",
                "runtime (model time / speed)",
            ],
            body2,
        ),  # fmt: skip
        "",
        "Budget 1.0 is not lossless: budget b keeps total rank floor(b·mn/(m+n)), half the spectrum of a square "
        "matrix at b = 1; there the square attention matrices stay dense (their factors would be no smaller) "
        f"and the {cfg['encoder_ffn_dim']}×{cfg['d_model']} feed-forward matrices keep rank "
        f"{cfg['encoder_ffn_dim'] * cfg['d_model'] // (cfg['encoder_ffn_dim'] + cfg['d_model'])} of "
        f"{cfg['d_model']}. {slower} of the {len(distinct)} compressed settings ran slower than the dense model. "
        + _lengths_sentence(results.get("output_lengths"))
        + "The poster's runtimes are not given in the issue.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    m30k = DEFAULT_DATA / "multi30k"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python -m benchmarks.translation --limit 300")  # fmt: skip
    parser.add_argument("--train-src", type=Path, default=m30k / "train.de.gz", help="default: %(default)s")
    parser.add_argument("--train-tgt", type=Path, default=m30k / "train.en.gz", help="default: %(default)s")
    parser.add_argument("--test-src", type=Path, default=m30k / "test_2016_flickr.de.gz", help="default: %(default)s")
    parser.add_argument("--test-tgt", type=Path, default=m30k / "test_2016_flickr.en.gz", help="default: %(default)s")
    sweep.add_args(parser, "test sentences evaluated (default: 300; 8 with --quick)")
    args = parser.parse_args(argv)
    sweep.setup(args)
    folder, log = sweep.trained(train_marian, args, [
        "--train-src", str(args.train_src), "--train-tgt", str(args.train_tgt),
        "--test-src", str(args.test_src), "--test-tgt", str(args.test_tgt)])  # fmt: skip
    limit = args.limit or (8 if args.quick else 300)
    options = {"references": args.test_tgt, "limit": limit, "num_beams": 4, "max_new_tokens": 64, "batch_size": 50}
    evals = {"test": Eval("translation", args.test_src, options)}
    t1, t2 = settings(args.quick)
    cache = args.cache_dir / "sweeps" / f"{NAME}{'-quick' if args.quick else ''}.json"
    with stopwatch() as wall:
        result = sweep.run_sweep(folder, evals, t1 + t2, cache, force=args.force)
    results = {
        "command": sweep.command(NAME, argv),
        "model": str(folder),
        "train_log": log,
        "sentences": result["dense"]["evals"]["test"]["examples"],
        "table1_budget": TABLE1_BUDGET,
        "table2_submatrices": TABLE2_SUBMATRICES,
        "dense": result["dense"],
        "table1": result["rows"][: len(t1)],
        "table2": result["rows"][len(t1) :],
        "wall_s": wall(),
        "measured_s": result["measured_s"],
        "output_lengths": None
        if args.quick
        else output_lengths(
            folder,
            read_lines(args.test_src)[:limit],
            (0.5, 0.1),
            args.cache_dir / "sweeps" / f"{NAME}-lengths.json",
            args.force,
        ),
        "machine": machine_info(),
    }
    name = f"{NAME}_quick" if args.quick else NAME
    write_results(name, results, args.results_dir)
    plot(results, args.results_dir / f"{name}.png")
    (args.results_dir / f"{name}.md").write_text(markdown(results, f"{name}.png"))
    return results


if __name__ == "__main__":
    main()
