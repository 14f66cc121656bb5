"""Scale and speed figures of issue 10, each with its anchor measured in the same run.

    OMP_NUM_THREADS=1 python -m benchmarks.speed --dense ~/.cache/svdlora/SmolLM2-135M --work /tmp/speed \
        [--budget 0.5] [--repeats 3] [--new-tokens 32] [--parts compress,load,decode]

compress: whole `svdlora compress` commands (fresh processes: the defaults in memory and --stream,
          --svd randomized, --no-pivot), wall time and peak RSS, vs the I/O floor (a fresh process
          that loads the dense checkpoint with from_pretrained and saves it with save_pretrained).
load:     fresh processes: time from after the imports to the end of the first forward pass
          (16 tokens), dense from_pretrained vs load_compressed factorized / merged.
load-imported: the same with the model's class imported before the clock (the import, the same
          for all three, is most of the load part's window).
distributed: `--stream` in 1 process vs `torchrun --nproc_per_node 2`, weight files compared.
decode:   batch-1 greedy decoding (generate, no sampling, a fixed number of new tokens),
          tokens/s of dense vs compressed factorized / pairs / merged / auto runtimes, one process;
          and prefill: one forward pass over a 256-token prompt, tokens/s.
layouts: one process, pivoted (the default) vs --no-pivot pairs, each also with --rank-multiple 8 and
          with its (out, R) factor laid out row-major as before layers.factor_layout: decode and
          prefill as above, and the warm merged load.
siblings: one process, q/k/v and gate/up stacked (stack_siblings=True) vs not, for the pivoted folder as
          stored and as pairs and for the --no-pivot folder: decode and prefill as above.
compiled: one process, the decode step compiled (torch.compile + a static KV cache; needs a C++
          compiler), dense vs pairs vs pivoted.
Repeats are interleaved so machine noise hits every variant alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mb, timed_run

ROOT = Path(__file__).resolve().parents[1]

LOAD_CHILD = """
import sys, time, torch
import transformers
from svdlora import load_compressed
kind, dense, compressed = sys.argv[1:4]
transformers.utils.logging.disable_progress_bar()
if sys.argv[4:] == ["imported"]:  # the model's class imported before the clock, as a running program has it
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(dense))]
start = time.perf_counter()
if kind == "dense":
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
else:
    model = load_compressed(compressed, device="cpu", runtime=kind)
with torch.no_grad():
    model(torch.arange(1, 17)[None])
print(time.perf_counter() - start)
"""

FLOOR_CHILD = """
import resource, sys, transformers
transformers.utils.logging.disable_progress_bar()
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").save_pretrained(sys.argv[2])
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB", file=sys.stderr)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run(cmd: list[str], stderr: bool = False):
    seconds, out, err = timed_run(cmd, env=_env())
    return (seconds, out, err) if stderr else (seconds, out)


def _compress_command(args, output=None) -> list[str]:
    """`svdlora compress` at ``--budget`` with the issue's protocol: plain SVD (the CLI calibrates by default)."""
    command = [sys.executable, "-m", "svdlora", "compress", args.dense, "--budget", str(args.budget), "--no-progress"]
    return [*command, "--calibration", "none", *(["-o", str(output)] if output else [])]


def part_compress(args, work: Path) -> dict:
    base = _compress_command(args)
    variants = {
        "I/O floor (from_pretrained + save_pretrained)": lambda out: [
            sys.executable,
            "-c",
            FLOOR_CHILD,
            args.dense,
            out,
        ],
        "svdlora compress (defaults: --svd exact, pivoted factors)": lambda out: [*base, "-o", out],
        "svdlora compress --stream": lambda out: [*base, "-o", out, "--stream"],
        "svdlora compress --svd randomized": lambda out: [*base, "-o", out, "--svd", "randomized"],
        "svdlora compress --no-pivot (factor pairs)": lambda out: [*base, "-o", out, "--no-pivot"],
    }
    times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            out = work / "compress-out"
            shutil.rmtree(out, ignore_errors=True)
            seconds, _, err = _run(make(str(out)), stderr=True)
            times[name].append(seconds)
            peaks[name].append(peak_rss_mb(err))
    floor = statistics.median(next(iter(times.values())))
    floor_peak = statistics.median(next(iter(peaks.values())))
    return {
        k: {
            "median_s": statistics.median(v),
            "all_s": v,
            "ratio_to_floor": statistics.median(v) / floor,
            "peak_rss_mb_median": statistics.median(peaks[k]),
            "peak_ratio_to_floor": statistics.median(peaks[k]) / floor_peak,
        }
        for k, v in times.items()
    }


def part_distributed(args, work: Path) -> dict:
    """--stream in one process vs torchrun with 2 processes: wall time, and the bytes compared."""
    common = [
        "compress",
        args.dense,
        "--budget",
        str(args.budget),
        "--no-progress",
        "--stream",
        "--calibration",
        "none",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "svdlora"]
    variants = {"1 process": [sys.executable, "-m", "svdlora"], "2 processes (torchrun)": torchrun}
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, launcher in variants.items():
            out = work / f"dist-{name[0]}"
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(_run([*launcher, *common, "-o", str(out)])[0])
    one, two = (sorted(p.name for p in (work / f"dist-{n}").glob("*.safetensors*")) for n in "12")
    same = one == two and all((work / "dist-1" / f).read_bytes() == (work / "dist-2" / f).read_bytes() for f in one)
    base = statistics.median(times["1 process"])
    rows = {
        k: {"median_s": statistics.median(v), "all_s": v, "ratio_to_1": statistics.median(v) / base}
        for k, v in times.items()
    }
    rows["identical_weight_files"] = same
    return rows


def part_load(args, compressed: Path, imported: bool = False) -> dict:
    """Fresh processes; ``imported``: the model's class (modeling_llama, ~1.5 s here, the same for all
    three) imported before the clock, which leaves the load itself and the first forward pass."""
    kinds = ["dense", "factorized", "merged"]
    times = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            extra = ["imported"] if imported else []
            _, out = _run([sys.executable, "-c", LOAD_CHILD, kind, args.dense, str(compressed), *extra])
            times[kind].append(float(out.strip().splitlines()[-1]))
    dense = statistics.median(times["dense"])
    return {
        k: {"median_s": statistics.median(v), "all_s": v, "ratio_to_dense": statistics.median(v) / dense}
        for k, v in times.items()
    }


def part_decode(args, compressed: Path) -> dict:
    import transformers

    from svdlora import load_compressed
    from svdlora.layers import LowRankLinear

    transformers.utils.logging.disable_progress_bar()
    models = {
        "dense": transformers.AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval(),
        "factorized": load_compressed(compressed, device="cpu", runtime="factorized"),
        "pairs": load_compressed(compressed, device="cpu", runtime="pairs"),
        "merged": load_compressed(compressed, device="cpu", runtime="merged"),
        "auto": load_compressed(compressed, device="cpu", runtime="auto"),
    }
    from svdlora.pivoted import PivotedLowRankLinear

    rows = _time_generation(models, args)
    auto = [m for m in models["auto"].modules() if isinstance(m, LowRankLinear)]
    rows["auto"]["layers_left_factorized"] = len(auto)
    rows["auto"]["layers_as_pairs"] = sum(not isinstance(m, PivotedLowRankLinear) for m in auto)
    return rows


def part_layouts(args, compressed: Path) -> dict:
    """Pivoted factors (the CLI's default) against ``--no-pivot`` pairs at the same budget, each also with
    ``--rank-multiple 8``, one process: decode and prefill interleaved, and the warm merged load (best of
    ``--repeats``)."""
    import transformers

    from svdlora import load_compressed

    aligned = ["--rank-multiple", "8"]
    flags = {"pairs": ["--no-pivot"], "pairs8": ["--no-pivot", *aligned], "pivoted8": aligned}
    folders = {"pivoted": compressed} | {name: _variant(args, compressed, name, f) for name, f in flags.items()}
    transformers.utils.logging.disable_progress_bar()
    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()}
    models.update({k: load_compressed(f, device="cpu", runtime="factorized") for k, f in folders.items()})
    for name in ("pairs", "pivoted"):  # the short-row factor as stored in the file, before layers.factor_layout
        models[f"{name}, row-major"] = _row_major(load_compressed(folders[name], device="cpu", runtime="factorized"))
    rows = _time_generation(models, args)
    for name, folder in folders.items():
        load_compressed(folder, device="cpu", merge=True)  # warm
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_compressed(folder, device="cpu", merge=True)
            times.append(time.perf_counter() - start)
        rows[name]["merged_load_warm_s"] = min(times)
    return rows


def part_siblings(args, compressed: Path) -> dict:
    """Sibling layers stacked (q/k/v and gate/up computing their input side in one matmul,
    ``stack_siblings=True``) against the same layers unstacked, one process, interleaved: the default
    pivoted folder as stored and as pairs, and the ``--no-pivot`` folder."""
    import transformers

    from svdlora import load_compressed

    transformers.utils.logging.disable_progress_bar()
    pairs = _variant(args, compressed, "pairs", ["--no-pivot"])
    variants = {"pivoted": (compressed, "factorized"), "pivoted as pairs": (compressed, "pairs"),
                "no-pivot pairs": (pairs, "factorized")}  # fmt: skip
    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()}
    for name, (folder, runtime) in variants.items():
        models[name] = load_compressed(folder, device="cpu", runtime=runtime)
        models[f"{name}, stacked"] = load_compressed(folder, device="cpu", runtime=runtime, stack_siblings=True)
    return _time_generation(models, args)


def part_compiled(args, compressed: Path) -> dict:
    """Decode with the step compiled (torch.compile, inductor, a static KV cache), dense vs pairs vs
    pivoted, one process: how much of the gap to the bytes ratio is Python and framework overhead."""
    import transformers

    from benchmarks.decoding import CompiledDecoder
    from svdlora import load_compressed

    transformers.utils.logging.disable_progress_bar()
    pairs = _variant(args, compressed, "pairs", ["--no-pivot"])
    models = {
        "dense": transformers.AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval(),
        "pairs": load_compressed(pairs, device="cpu"),
        "pivoted": load_compressed(compressed, device="cpu"),
    }
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789]])
    decoders, rows = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        decoders[name] = CompiledDecoder(model, prompt.shape[1] + args.new_tokens + 1, "default", "inductor")
        decoders[name].decode(prompt, 3, "cpu")  # compile
        rows[name] = {"compile_s": time.perf_counter() - start, "all": []}
        _, tokens = decoders[name].decode(prompt, args.new_tokens, "cpu", keep=True)
        with torch.no_grad():  # the compiled step must give the eager model's greedy tokens
            eager = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0)[0, prompt.shape[1] :].tolist()  # fmt: skip
        rows[name]["tokens_match_eager"] = sum(a == b for a, b in zip(tokens, eager, strict=False)) / len(eager)
    for _ in range(args.repeats):
        for name, decoder in decoders.items():
            seconds, _ = decoder.decode(prompt, args.new_tokens, "cpu")
            rows[name]["all"].append(args.new_tokens / seconds)
    dense = statistics.median(rows["dense"]["all"])
    for row in rows.values():
        row["tokens_per_s"] = statistics.median(row["all"])
        row["ratio_to_dense"] = row["tokens_per_s"] / dense
    return rows


def _variant(args, compressed: Path, name: str, flags: list[str]) -> Path:
    """The folder ``compressed`` with extra ``compress`` flags, beside it; compressed on first use."""
    folder = compressed.with_name(f"{compressed.name}-{name}")
    if not folder.exists():
        _run([*_compress_command(args, folder), *flags])
    return folder


def _row_major(model):
    """``model`` with its (out, R) factors (A, or the pivoted C) laid out row by row again."""
    from svdlora.layers import LowRankLinear

    for module in model.modules():
        for name in ("A", "C"):
            factor = module._parameters.get(name) if isinstance(module, LowRankLinear) else None
            if factor is not None:
                setattr(module, name, torch.nn.Parameter(factor.detach().contiguous(), requires_grad=False))
    return model


def _time_generation(models: dict, args) -> dict:
    """Decode and prefill tokens/s per model, the models interleaved in every repeat; ratios to "dense"."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789]])
    long_prompt = torch.randint(1, 40000, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    rates = {k: [] for k in models}
    prefill = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            with torch.no_grad():
                start = time.perf_counter()
                model(long_prompt)
                prefill[name].append(args.prefill_tokens / (time.perf_counter() - start))
                start = time.perf_counter()
                model.generate(
                    prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=0,
                )  # fmt: skip
                rates[name].append(args.new_tokens / (time.perf_counter() - start))
    dense = statistics.median(rates["dense"])
    rows = {
        k: {"tokens_per_s": statistics.median(v), "all": v, "ratio_to_dense": statistics.median(v) / dense}
        for k, v in rates.items()
    }
    dense_prefill = statistics.median(prefill["dense"])
    for k, v in prefill.items():
        rows[k]["prefill_tokens_per_s"] = statistics.median(v)
        rows[k]["prefill_ratio_to_dense"] = statistics.median(v) / dense_prefill
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill timing")
    p.add_argument("--parts", default="compress,load,decode")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    compressed = work / f"compressed-{args.budget}"
    if not compressed.exists():
        _run(_compress_command(args, compressed))
    result = {
        "budget": args.budget,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for part in args.parts.split(","):
        parts = {
            "compress": part_compress, "load": part_load, "decode": part_decode, "distributed": part_distributed,
            "layouts": part_layouts, "siblings": part_siblings, "compiled": part_compiled,
            "load-imported": lambda a, c: part_load(a, c, imported=True),
        }  # fmt: skip
        result[part] = parts[part](args, work if part in ("compress", "distributed") else compressed)
        print(part, json.dumps(result[part], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
