"""Where batch-1 decode time goes on a CPU: matrix products vs everything else, dense vs factorized.

    OMP_NUM_THREADS=1 python -m benchmarks.decode_profile --dense ~/.cache/svdlora/SmolLM2-135M \\
        --compressed /tmp/w10g/compressed-0.5-pairs [--tokens 16]

torch.profiler over one greedy `generate` per model (after a 4-token warm-up): wall time per token
and the self time of aten::mm / addmm / bmm / matmul / linear per token. With the bytes each model's
matrices hold, it bounds what factorized decode can gain: the non-matmul time stays.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from svdlora import load_compressed

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--compressed", required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    models = {
        "dense": transformers.AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval(),
        "factorized": load_compressed(args.compressed, device="cpu"),
    }
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789]])
    rows = {}
    for name, model in models.items():
        options = {"do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **options)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **options)
                wall = time.perf_counter() - start
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        matmul_ms = sum(v for k, v in self_us.items() if k in MATMULS) / args.tokens / 1e3
        weight_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
        weight_bytes += sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith((".A", ".B", ".C")))
        rows[name] = {"ms_per_token": wall / args.tokens * 1e3, "matmul_ms_per_token": matmul_ms,
                      "other_ms_per_token": wall / args.tokens * 1e3 - matmul_ms,
                      "matrix_bytes": weight_bytes}  # fmt: skip
        print(f"{name}: {rows[name]['ms_per_token']:.1f} ms/token, matmuls {matmul_ms:.1f} ms "
              f"({weight_bytes / 1e6:.0f} MB of matrices, {weight_bytes / matmul_ms / 1e6:.1f} GB/s), "
              f"other {rows[name]['other_ms_per_token']:.1f} ms")  # fmt: skip
    dense, fact = rows["dense"], rows["factorized"]
    at_dense_rate = fact["matrix_bytes"] / (dense["matrix_bytes"] / dense["matmul_ms_per_token"])
    bound = dense["ms_per_token"] / (fact["other_ms_per_token"] + at_dense_rate)
    rows["bound"] = {"speedup_if_factor_matmuls_ran_at_dense_bandwidth": bound,
                     "measured_speedup": dense["ms_per_token"] / fact["ms_per_token"]}  # fmt: skip
    print(f"measured {rows['bound']['measured_speedup']:.2f}x; with the factor matmuls at the dense matmuls' "
          f"bytes/s and the other time as measured: {bound:.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
