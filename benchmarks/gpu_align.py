"""Rank alignment and batch-1 decode on a GPU: factor ranks that are multiples of 8 vs the budget's exact ranks.

    PYTHONPATH=$PWD python3 benchmarks/gpu_align.py --out OUT [--deadline 170]
    dry run on a CPU: ... --small --device cpu

A Llama-2-7B-shaped model (random bf16 weights, built on the device, never saved) and copies of it
whose decoder Linear layers are replaced by random factors of the ranks a uniform budget of 0.5
gives: "pairs" at the exact rank (4096x11008: 1492, 4096x4096: 1024), "pairs8" and "pivoted8" at
that rank rounded down to a multiple of 8 (1488). Random factors suffice: speed depends on shapes
only. Each variant decodes greedily through a StaticCache with the step under
torch.compile(mode="reduce-overhead") (CUDA graphs; benchmarks.decoding.CompiledDecoder), so launch overhead
is gone and per-token time is kernel time (``--eager``: the step uncompiled, launch-bound as in
generate()). Variants are timed in rotated order; medians.
Motivation (gpu_rows, 2026-11-26): cuBLAS's batch-1 GEMV of an (out, R) bf16 matrix took 13.3 us at
R = 1492 and 7.6 us at R = 1488 (rows not 16-byte aligned).
"pivoted+pairs" / "pivoted+auto" / "pivoted+auto-graphs" (and the same at multiples of 8): the pivoted
layers turned into plain pairs, or each layer's fastest layout measured on the device (svdlora.runtime:
eager calls, or CUDA-graph replays), as load_compressed(..., runtime="pairs" / "auto" / "auto-graphs") does.
A "+stacked" suffix on any factorized variant stacks its sibling layers (q/k/v, gate/up) as
load_compressed(..., stack_siblings=True) does.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decoding import CompiledDecoder  # noqa: E402
from benchmarks.gpu_rows import SMOLLM2_135M  # noqa: E402
from svdlora.decompose import rank_for_budget  # noqa: E402
from svdlora.layers import LowRankLinear  # noqa: E402
from svdlora.pivoted import PivotedLowRankLinear, index_values  # noqa: E402
from svdlora.runtime import apply_runtime  # noqa: E402
from svdlora.siblings import stack_siblings  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def llama7b(small: bool) -> dict:
    cfg = {**SMOLLM2_135M, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000,
           "tie_word_embeddings": False,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}  # fmt: skip
    if small:
        cfg.update(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=32, vocab_size=640)  # fmt: skip
    return cfg


def factorized_copy(dense, layout: str, multiple: int, gen: torch.Generator):
    """``dense`` with every decoder Linear replaced by random factors (pairs or pivoted) of budget-0.5 ranks."""
    model = copy.deepcopy(dense)
    ranks = {}
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, module in list(parent.named_children()):
                if not isinstance(module, torch.nn.Linear):
                    continue
                out_f, in_f = module.out_features, module.in_features
                dev, dt = module.weight.device, module.weight.dtype
                pivoted = layout == "pivoted"  # priced with its pivot indices, as compress prices it
                rank = rank_for_budget(out_f, in_f, 0.5, pivoted, index_values(dt) if pivoted else 0)
                rank -= rank % multiple
                ranks[f"{out_f}x{in_f}"] = rank
                scale = (0.02 / rank**0.5) ** 0.5  # A·B entries ~ 0.02, as the dense init
                if layout == "pairs":
                    a = torch.randn(out_f, rank, generator=gen).mul_(scale)
                    b = torch.randn(rank, in_f, generator=gen).mul_(scale)
                    new = LowRankLinear.from_factors(module, a, b, [rank])
                else:
                    new = PivotedLowRankLinear.shaped_for(module, [rank])
                    with torch.no_grad():
                        new.B.copy_(torch.randn(rank, in_f, generator=gen).mul_(0.02))
                        new.C.copy_(torch.randn(out_f - rank, rank, generator=gen).mul_(1 / rank))
                        new.rows.copy_(torch.randperm(out_f, generator=gen)[:rank].sort().values)
                setattr(parent, name, new.to(device=dev, dtype=dt))
                del module
    return model.eval(), ranks


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--deadline", type=float, default=170)
    p.add_argument("--timing-reserve", type=float, default=30, help="seconds kept for the timings (default 30)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="dense,pairs,pairs8,pivoted8")
    p.add_argument("--eager", action="store_true", help="decode step uncompiled: kernel launches as in generate()")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev, cuda = args.device, args.device.startswith("cuda")
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": "bfloat16", "tokens": args.tokens, "argv": sys.argv[1:], "variants": {}}  # fmt: skip

    def save():
        (out / "gpu_align.json").write_text(json.dumps(res, indent=2))

    config = transformers.LlamaConfig(**{k: v for k, v in llama7b(args.small).items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(dev):
        dense = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    log("built dense", sum(p.numel() for p in dense.parameters()) / 1e9, "B parameters")
    gen = torch.Generator().manual_seed(0)
    layouts = {"dense": None, "pairs": ("pairs", 1), "pairs8": ("pairs", 8), "pivoted8": ("pivoted", 8),
               "pivoted": ("pivoted", 1)}  # fmt: skip
    for name in ("pivoted", "pivoted8"):  # pivoted folders loaded with runtime="pairs" / "auto"
        for runtime in ("pairs", "auto", "auto-graphs"):
            layouts[f"{name}+{runtime}"] = (*layouts[name], runtime)
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 89]], device=dev) % config.vocab_size
    mode = "reduce-overhead" if cuda else "default"
    backend = None if args.eager else "inductor"
    decoders, slowest = {}, 0.0  # the longest build + compile so far
    for name in args.variants.split(","):
        # a variant starts only if it and a first round of timings fit (a cold inductor cache, 38-45 s per
        # compile on the H200, left run 12 with every variant compiled and none timed)
        if time.time() - T0 > args.deadline - args.timing_reserve - slowest:
            res["variants"][name] = {"skipped": "deadline"}
            continue
        began = time.time()
        layout = layouts[name.removesuffix("+stacked")]
        model, ranks = (dense, {}) if layout is None else factorized_copy(dense, *layout[:2], gen)
        picked = apply_runtime(model, layout[2]) if layout is not None and len(layout) > 2 else {}
        groups = len(stack_siblings(model)) if name.endswith("+stacked") else 0
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        start = time.perf_counter()
        decoder = CompiledDecoder(model, prompt.shape[1] + args.tokens + 1, mode, backend)
        decoder.decode(prompt, 3, dev)  # compile + CUDA-graph recording
        decoder.decode(prompt, 3, dev)
        decoders[name] = decoder
        res["variants"][name] = {"ranks": ranks, "weight_bytes": weights, "compile_s": time.perf_counter() - start,
                                 "layouts": dict(Counter(picked.values())), "stacked_groups": groups}  # fmt: skip
        log(f"{name}: ranks {ranks}, {weights / 1e9:.2f} GB, compiled in {time.perf_counter() - start:.1f}s")
        save()
        slowest = max(slowest, time.time() - began)
    names = list(decoders)
    times = {n: [] for n in names}
    for r in range(args.repeats):
        if time.time() - T0 > args.deadline - 5:
            break
        for n in names[r % len(names) :] + names[: r % len(names)]:
            seconds, _ = decoders[n].decode(prompt, args.tokens, dev)
            times[n].append(args.tokens / seconds)
    base = statistics.median(times["dense"]) if times.get("dense") else None
    for n in names:
        if times[n]:
            med = statistics.median(times[n])
            res["variants"][n].update(tok_s=med, all_tok_s=times[n], ratio_to_dense=med / base if base else None)
    summary = {n: (res["variants"][n].get("tok_s", 0), res["variants"][n].get("ratio_to_dense") or 0) for n in names}
    log(", ".join(f"{n} {tok:.0f} tok/s x{ratio:.2f}" for n, (tok, ratio) in summary.items()))
    res["elapsed_s"] = time.time() - T0
    save()


if __name__ == "__main__":
    main()
