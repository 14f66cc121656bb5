"""Streamed calibration with `--device cuda` (the block passes on the GPU) against the CPU.

    PYTHONPATH=$PWD python3 benchmarks/gpu_calibration.py --tokenizer DIR --text FILE --work DIR --out OUT
    dry run on a CPU: ... --device cpu --small

No pretrained model reaches the GPU machine, so the checkpoints are random (normal, std 0.02), built
from configs with the GPT-2 tokenizer's vocabulary; the text is WikiText-2 *valid*. Rows, each a
fresh `svdlora compress --stream --calibration TEXT --budget 0.5` process:
  smollm2  SmolLM2-135M's shape (30 blocks, hidden 576, float32), --samples windows of 512 tokens:
           the default (kfac + global allocation: a forward and a backward pass block by block) and
           whiten + uniform, each on the CPU (every core) and with --device cuda; wall time, and how
           far the GPU run's factors are from the CPU's: the ranks global allocation chose, and each
           layer's relative error ||W - AB|| / ||W|| (rounding differs by device, so bits do not).
  llama7b  Llama-2-7B's block shape (hidden 4096, MLP 11008, 32 heads), --blocks blocks, bfloat16,
           the default with --device cuda only (the CPU would take hours): wall time per block.
Results go to OUT/gpu_calibration.json, each process's stderr to OUT/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import peak_rss_mb, timed_run  # noqa: E402


def build(folder: Path, tokenizer: Path, dtype: torch.dtype, **shape) -> Path:
    """A random Llama checkpoint of ``shape`` with the tokenizer beside it."""
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = GPT2Tokenizer.from_pretrained(str(tokenizer))
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, **shape
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def compress(model: Path, out: Path, text: Path, samples: int, flags: list[str], log: Path) -> dict:
    argv = [sys.executable, "-m", "svdlora", "compress", str(model), "-o", str(out), "--overwrite", "--no-progress"]
    argv += ["--stream", "--budget", "0.5", "--calibration", str(text), "--calibration-samples", str(samples), *flags]
    try:
        seconds, _, err = timed_run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except RuntimeError as failed:
        log.write_text(str(failed))
        raise SystemExit(str(failed)) from None
    log.write_text(err[-20000:])
    report = json.loads((out / "svdlora_config.json").read_text())
    layers = {m["name"]: (m.get("ranks"), m.get("rel_error")) for m in report["report"]["modules"]}
    return {"flags": flags, "seconds": round(seconds, 1), "peak_rss_mb": int(peak_rss_mb(err)), "layers": layers}


def agreement(cpu: dict, gpu: dict) -> dict:
    same = [n for n in cpu["layers"] if cpu["layers"][n][0] == gpu["layers"][n][0]]
    gaps = [
        abs(cpu["layers"][n][1] - gpu["layers"][n][1])
        for n in cpu["layers"]
        if cpu["layers"][n][1] is not None and gpu["layers"][n][1] is not None
    ]
    return {"layers": len(cpu["layers"]), "same_ranks": len(same), "max_rel_error_gap": max(gaps, default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with GPT-2's vocab.json and merges.txt")
    ap.add_argument("--text", type=Path, required=True, help="calibration text (WikiText-2 valid)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the script)")
    ap.add_argument("--methods", nargs="+", choices=("default", "whiten"), default=["default", "whiten"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    smol = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    big = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    results = {
        "benchmark": "gpu_calibration",
        "samples": args.samples,
        "machine": {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": {},
    }

    def save():
        (args.out / "gpu_calibration.json").write_text(json.dumps(results, indent=1, sort_keys=True))

    layers, shape = (4, small) if args.small else (30, smol)
    model = build(args.work / "smollm2", args.tokenizer, torch.float32, num_hidden_layers=layers, **shape)
    methods = {"default": [], "whiten": ["--method", "whiten", "--allocation", "uniform"]}
    for method, flags in ((m, methods[m]) for m in args.methods):
        runs = {}
        for where, extra in (("cpu", []), (args.device, ["--device", args.device])):
            key = f"smollm2 {method} {where}"
            runs[where] = compress(
                model,
                args.work / "out",
                args.text,
                args.samples,
                flags + extra,
                args.out / f"{key.replace(' ', '_')}.log",
            )
            results["rows"][key] = {k: v for k, v in runs[where].items() if k != "layers"}
            print(key, results["rows"][key], flush=True)
            save()
        results["rows"][f"smollm2 {method} agreement"] = agreement(runs["cpu"], runs[args.device])
        print(method, results["rows"][f"smollm2 {method} agreement"], flush=True)
        save()
    model = build(
        args.work / "llama7b",
        args.tokenizer,
        torch.bfloat16,
        num_hidden_layers=args.blocks,
        **(small if args.small else big),
    )
    run = compress(
        model, args.work / "out7b", args.text, args.samples, ["--device", args.device], args.out / "llama7b.log"
    )
    results["rows"][f"llama7b default {args.device}"] = {
        **{k: v for k, v in run.items() if k != "layers"},
        "blocks": args.blocks,
    }
    print(results["rows"][f"llama7b default {args.device}"], flush=True)
    save()


if __name__ == "__main__":
    main()
