"""A model whose forward reads a layer's ``.weight``: one decoder step of a T5-small-shaped model, dense and
compressed, loaded as stored ("factorized"), with ``runtime="auto"`` and merged.

    OMP_NUM_THREADS=1 python -m benchmarks.weight_read --work /tmp/weight_read [--repeats 5] [--name weight_read]

T5's feed-forward reads ``self.wo.weight.dtype`` on every call, and ``LowRankLinear.weight`` multiplies A·B on
each read; ``auto`` merges such layers untimed (``runtime.read_as_weight``). Random weights (d_model 512, d_ff
2048, 4 + 4 layers, budget 0.5, plain SVD); the step is a decoder forward of one token over a 16-token encoding,
the best of 20-call batches, the variants interleaved ``--repeats`` times (medians reported).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import write_results

RUNTIMES = ("factorized", "auto", "merged")


def _step_seconds(model, encoding, decoder_ids, calls: int = 20) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            model(encoder_outputs=encoding, decoder_input_ids=decoder_ids)
        return (time.perf_counter() - start) / calls


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the compressed model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="weight_read", help="results file name (benchmarks/results/NAME.json)")
    args = p.parse_args(argv)

    from transformers import T5Config, T5ForConditionalGeneration

    from svdlora import compress, load_compressed, save_compressed

    torch.manual_seed(0)
    config = T5Config(d_model=512, d_ff=2048, num_layers=4, num_decoder_layers=4, num_heads=8, d_kv=64,
                      vocab_size=1000, feed_forward_proj="relu")  # fmt: skip
    dense = T5ForConditionalGeneration(config).eval()
    compressed = copy.deepcopy(dense)
    compress(compressed, budget=0.5, progress=False)
    shutil.rmtree(args.work, ignore_errors=True)
    save_compressed(compressed, args.work)
    models = {"dense": dense} | {rt: load_compressed(args.work, device="cpu", runtime=rt) for rt in RUNTIMES}
    wo = {k: sorted({type(m).__name__ for n, m in v.named_modules() if n.endswith(".wo")}) for k, v in models.items()}

    ids, decoder_ids = torch.randint(0, 1000, (1, 16)), torch.randint(0, 1000, (1, 1))
    with torch.no_grad():
        encoding = dense.get_encoder()(ids)
    times = {k: [] for k in models}
    for model in models.values():  # warm-up
        _step_seconds(model, encoding, decoder_ids, calls=3)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_step_seconds(model, encoding, decoder_ids))
    anchor = statistics.median(times["dense"])
    rows = {
        k: {"step_ms": 1e3 * statistics.median(v), "all_ms": [1e3 * t for t in v],
            "ratio_to_dense": statistics.median(v) / anchor, "wo_layers_as": wo[k]}
        for k, v in times.items()
    }  # fmt: skip
    for k, row in rows.items():
        print(f"{k:12s} {row['step_ms']:7.1f} ms  {row['ratio_to_dense']:.2f}x dense  wo as {row['wo_layers_as']}")
    print(write_results(args.name, {"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
