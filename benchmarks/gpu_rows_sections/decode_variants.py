# ruff: noqa: E501  (the log lines kept as they ran on the GPU)
"""decode1b / decode135v / decode7b: batch-1 greedy decode of dense / pivoted / pairs / merged at one budget,
eager (generate()) and compiled (StaticCache + torch.compile of the decode step: CUDA graphs on a GPU)."""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from benchmarks.decoding import CompiledDecoder, sync
from benchmarks.gpu_rows_sections.compressing import compress_cmd, compress_parallel
from benchmarks.gpu_rows_sections.dynamo_watch import (
    CUDAGRAPH_MESSAGES,
    dynamo_counts,
    pivot_graph_breaks,
    watch_cudagraph_skips,
)
from benchmarks.gpu_rows_sections.models import build
from benchmarks.gpu_rows_sections.state import RESULTS, left, log, save

VARIANTS = ("dense", "pivoted", "pairs", "merged")


def rotated(names, r):
    """The variant order of repeat r: rotated by one each repeat, so no variant always runs first."""
    names = list(names)
    return names[r % len(names) :] + names[: r % len(names)]


def stats(values, anchor=None) -> dict:
    med = statistics.median(values)
    row = {"median": med, "min": min(values), "max": max(values), "all": values}
    if anchor:
        row["ratio_to_dense"] = med / anchor
    return row


def layer_counts(model) -> dict:
    from torch import nn

    from svdlora.layers import LowRankLinear
    from svdlora.pivoted import PivotedLowRankLinear

    mods = list(model.modules())
    return {
        "factorized_layers": sum(isinstance(m, LowRankLinear) for m in mods),
        "pivoted_layers": sum(isinstance(m, PivotedLowRankLinear) for m in mods),
        "dense_linear_layers": sum(isinstance(m, nn.Linear) for m in mods),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }


def section_decode_variants(args, work, cfg, key, section):
    """Batch-1 greedy decode of dense / pivoted / pairs / merged at one budget, eager and compiled."""
    import transformers

    from svdlora import load_compressed

    res = RESULTS.setdefault(section, {})
    dev, dtype = args.device, torch.bfloat16
    budget = args.variants_budget
    res["settings"] = {"model": key, "dtype": "bfloat16", "budget": budget, "device": dev,
                       "device_name": RESULTS["env"]["device"], "torch": torch.__version__,
                       "transformers": transformers.__version__, "eager_repeats": args.eager_repeats,
                       "new_tokens_eager": args.new_tokens, "compiled_tokens": args.compiled_tokens,
                       "compiled_repeats": args.compiled_repeats, "prefill_tokens": args.prefill_tokens,
                       "prefill_inner": args.prefill_inner}  # fmt: skip
    dense = build(key, cfg, work, dev)
    folders = {"pivoted": work / f"{key}-{budget}-pivot", "pairs": work / f"{key}-{budget}-pairs"}
    svd_dev = dev if dev.startswith("cuda") else None
    jobs = {
        name: (compress_cmd(dense, out, budget, svd_dev, pivot=name == "pivoted"), out) for name, out in folders.items()
    }
    res["compress"] = compress_parallel(jobs, timeout=max(30, left(args) - 90))
    log(f"compress {key}: " + ", ".join(f"{k} {v['wall_s']:.1f}s" if "wall_s" in v else f"{k} reused"
                                        for k, v in res["compress"].items()))  # fmt: skip
    save(args)

    sync(dev)
    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, device_map=dev).eval(),
              "pivoted": load_compressed(folders["pivoted"], device=dev, dtype=dtype, runtime="factorized"),
              "pairs": load_compressed(folders["pairs"], device=dev, dtype=dtype, runtime="factorized"),
              "merged": load_compressed(folders["pivoted"], device=dev, dtype=dtype, runtime="merged")}  # fmt: skip
    res["layers"] = {k: layer_counts(m) for k, m in models.items()}
    res["layers"]["merged"]["merged_from"] = "pivoted folder"
    if dev.startswith("cuda"):
        res["cuda_allocated_all_loaded"] = torch.cuda.memory_allocated()
    log(f"loaded {key}: " + ", ".join(f"{k} {v['factorized_layers']} factorized ({v['pivoted_layers']} pivoted), "
                                      f"{v['weight_bytes'] / 1e6:.0f} MB" for k, v in res["layers"].items()))  # fmt: skip

    vocab = models["dense"].config.vocab_size
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 89]], device=dev) % min(500, vocab)
    long_prompt = torch.randint(1, vocab, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0)).to(dev)

    eager_tokens = eager_rows(args, models, prompt, long_prompt, res)
    save(args)
    compiled_rows(args, models, prompt, eager_tokens, res)
    del models
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def eager_rows(args, models: dict, prompt, long_prompt, res: dict) -> dict:
    """res["eager"]: generate() and prefill rates per variant, rotated repeats; returns each variant's greedy tokens."""
    dev, n = args.device, args.new_tokens

    def generate(model):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    # (1) eager: transformers' generate (dynamic cache), warm-up = one full-length generate + one prefill per model
    eager_tokens = {}
    with torch.no_grad():
        for name, model in models.items():
            eager_tokens[name] = generate(model)[0, prompt.shape[1] :].tolist()
            model(long_prompt)
    sync(dev)
    rates, prefill = {k: [] for k in models}, {k: [] for k in models}
    for r in range(args.eager_repeats):
        if r >= 3 and left(args) < args.compile_reserve:
            res["eager_stopped"] = f"after {r} repeats: {left(args):.0f}s left"
            break
        for name in rotated(models, r):
            model = models[name]
            with torch.no_grad():
                sync(dev)
                start = time.perf_counter()
                for _ in range(args.prefill_inner):
                    model(long_prompt)
                sync(dev)
                prefill[name].append(args.prefill_tokens * args.prefill_inner / (time.perf_counter() - start))
                start = time.perf_counter()
                generate(model)
                sync(dev)
                rates[name].append(n / (time.perf_counter() - start))
    res["eager"] = {"what": f"generate() {n} new tokens after an {prompt.shape[1]}-token prompt, default dynamic cache, "
                            "tok/s = new tokens / wall (prefill of the prompt included); variant order rotated each repeat",
                    "order_of_repeat_0": list(models)}  # fmt: skip
    for name in models:
        res["eager"][name] = {"decode_tok_s": stats(rates[name], statistics.median(rates["dense"])),
                              "prefill_tok_s": stats(prefill[name], statistics.median(prefill["dense"])),
                              "greedy_tokens_match_dense": sum(a == b for a, b in zip(eager_tokens[name], eager_tokens["dense"], strict=True)) / n}  # fmt: skip
    log("eager " + ", ".join(f"{k} {v['decode_tok_s']['median']:.1f} tok/s x{v['decode_tok_s']['ratio_to_dense']:.2f} "
                             f"(prefill x{v['prefill_tok_s']['ratio_to_dense']:.2f})" for k, v in res["eager"].items()
                             if isinstance(v, dict) and "decode_tok_s" in v))  # fmt: skip
    return eager_tokens


def compiled_rows(args, models: dict, prompt, eager_tokens: dict, res: dict) -> None:
    """res["compiled"]: each variant in --compile-variants order compiled (falling back to another backend where one
    fails), then timed in rotated repeats against dense compiled with the same backend."""
    dev, n = args.device, args.new_tokens
    # (2) compiled: static cache + torch.compile of the decode step (CUDA graphs on a GPU)
    cuda = dev.startswith("cuda")
    mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    # auto: inductor, else dynamo's "cudagraphs" backend (no code generation; on a CPU it runs the graph as is)
    backends = ["inductor", "cudagraphs"] if args.compile_backend == "auto" else [args.compile_backend]
    comp = res["compiled"] = {"what": f"StaticCache + torch.compile(step, mode={mode!r}) of forward+argmax, "
                                      f"{args.compiled_tokens} decode steps timed after an eager prefill of the "
                                      f"{prompt.shape[1]}-token prompt; tok/s = steps / their wall; order rotated",
                              "mode": mode, "backends_tried": backends}  # fmt: skip
    for attr in ("recompile_limit", "cache_size_limit"):  # one entry per model on the shared step code
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 64)
    try:
        comp["pivoted_one_layer_trace"] = pivot_graph_breaks(models["pivoted"])
    except Exception as err:
        comp["pivoted_one_layer_trace"] = {"error": repr(err)[:500]}
    watch_cudagraph_skips()
    first_message = len(CUDAGRAPH_MESSAGES)
    decoders, last_compile = {}, 0.0
    max_len = prompt.shape[1] + args.compiled_tokens + 1

    def try_compile(name, tries):
        """Compile variant ``name`` ("dense@cudagraphs": with that backend) with the first backend that works."""
        nonlocal last_compile
        row = comp.setdefault(name, {})
        base = name.split("@")[0]
        if base not in models:
            row["error"] = f"unknown variant {name!r}"
            return
        need = args.compile_reserve + 1.3 * last_compile
        if left(args) < need:
            row["skipped"] = f"deadline: {left(args):.0f}s left, {need:.0f}s wanted"
            log(f"compiled {name}: skipped, {left(args):.0f}s left")
            return
        for backend in tries:
            before = dynamo_counts()
            start = time.perf_counter()
            try:
                decoder = CompiledDecoder(models[base], max_len, mode, backend)
                first, tokens = decoder.decode(prompt, args.compiled_tokens, dev, keep=True)  # compiles
                second, _ = decoder.decode(prompt, args.compiled_tokens, dev)  # CUDA graph recorded / warmed
                third, _ = decoder.decode(prompt, args.compiled_tokens, dev)
            except Exception as err:
                row.setdefault("errors", {})[backend] = {"error": repr(err)[:1500], "after_s": time.perf_counter() - start,
                                                         "traceback_tail": traceback.format_exc()[-3000:]}  # fmt: skip
                log(f"compiled {name} ({backend}) FAILED after {time.perf_counter() - start:.0f}s: {repr(err)[:300]}")
                if backend == "inductor" and len(backends) > 1:  # most likely the toolchain: not again for the others
                    backends.remove("inductor")
                    comp["inductor_dropped_after"] = name
                continue  # no torch._dynamo.reset(): it would drop the variants already compiled
            seconds = time.perf_counter() - start
            last_compile = max(last_compile, seconds)  # merged reuses dense's graph: no guide for the next one
            after = dynamo_counts()
            k = min(n, args.compiled_tokens + 1)  # tokens[0] is the prefill's, as generate's first
            row.update({"backend": backend, "compile_and_warmup_s": seconds,
                        "warmup_runs_s": [first, second, third],
                        "new_graphs": after["unique_graphs"] - before["unique_graphs"],
                        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
                        "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"],
                        # a graph reused from an earlier variant (merged: dense's) was judged when it was made
                        "cuda_graphs": (cuda and after["cudagraph_skips"] == before["cudagraph_skips"])
                        if after["unique_graphs"] > before["unique_graphs"] else "as the variant whose graph it reuses",
                        "greedy_tokens_match_eager": sum(a == b for a, b in zip(tokens[:k], eager_tokens[base][:k], strict=True)) / k})  # fmt: skip
            decoders[name] = decoder
            log(
                f"compiled {name} ({backend}): {seconds:.1f}s compile+warm-up, graphs {row['new_graphs']}, "
                f"breaks {row['graph_breaks']}, cudagraph skips {row['cudagraph_skips']}, "
                f"tokens match eager {row['greedy_tokens_match_eager']:.2f}"
            )
            break
        save(args)

    for name in [v for v in args.compile_variants.split(",") if v]:
        try_compile(name, list(backends))
    # ratios compare one backend: where a variant fell back to another one, dense is compiled with it too
    anchors = {comp[k]["backend"] for k in decoders if k.split("@")[0] == "dense"}
    for backend in sorted({comp[k]["backend"] for k in decoders} - anchors):
        try_compile(f"dense@{backend}", [backend])
    if decoders:
        times = {k: [] for k in decoders}
        for r in range(args.compiled_repeats):
            if r >= 3 and left(args) < 15:
                comp["stopped"] = f"after {r} repeats: {left(args):.0f}s left"
                break
            for name in rotated(decoders, r):
                seconds, _ = decoders[name].decode(prompt, args.compiled_tokens, dev)
                times[name].append(args.compiled_tokens / seconds)
        anchor = {comp[k]["backend"]: statistics.median(v) for k, v in times.items() if k.split("@")[0] == "dense"}
        for name, values in times.items():
            comp[name]["decode_tok_s"] = stats(values, anchor.get(comp[name]["backend"]))
            comp[name]["ms_per_token"] = 1000 / statistics.median(values)
        comp["order_of_repeat_0"] = list(decoders)
        log("compiled " + ", ".join(f"{k} {comp[k]['decode_tok_s']['median']:.0f} tok/s"
                                    + (f" x{comp[k]['decode_tok_s']['ratio_to_dense']:.2f}" if "ratio_to_dense" in comp[k]["decode_tok_s"] else "")
                                    for k in decoders))  # fmt: skip
    comp["cudagraph_messages"] = sorted(set(CUDAGRAPH_MESSAGES[first_message:]))
