"""Plain ``AutoModel*.from_pretrained`` vs ``svdlora.load_compressed``: same logits? how long to load?

Tiny models (GPT-2, Llama, BERT, ViT, Marian, built from configs, compressed at budget 0.5 with
2 submatrices) and, when given, a real checkpoint (``--real``, e.g. SmolLM2-135M at budget 0.5 /
3 submatrices). For each: the largest absolute logit difference between the two loaders (factors
kept, and merged), and the median load time over ``--repeats`` interleaved runs, on CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.from_pretrained --real /root/.cache/svdlora/SmolLM2-135M
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import svdlora
from svdlora.integrations import SvdloraQuantizationConfig

from .common import write_results

AUTO = {
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
    "bert": "AutoModelForSequenceClassification",
    "vit": "AutoModelForImageClassification",
    "marian": "AutoModelForSeq2SeqLM",
}


def _tiny(kind: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import TINY_MODELS, example_inputs

    torch.manual_seed(0)
    return TINY_MODELS[kind]().eval(), example_inputs(kind)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(folder: Path, auto: str, inputs: dict, repeats: int) -> dict:
    cls = getattr(transformers, auto)
    row = {}
    for merge in (False, True):
        times = {"load_compressed": [], "from_pretrained": []}
        options = {"quantization_config": SvdloraQuantizationConfig(merge=True)} if merge else {}
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            ref, t_ref = _timed(lambda m=merge: svdlora.load_compressed(folder, device="cpu", merge=m))
            got, t_got = _timed(lambda o=options: cls.from_pretrained(folder, **o))
            times["load_compressed"].append(t_ref)
            times["from_pretrained"].append(t_got)
        diff = (_logits(ref, inputs) - _logits(got, inputs)).abs().max().item()
        key = "merged" if merge else "factorized"
        row[key] = {
            "max_abs_logit_diff": diff,
            "identical": diff == 0.0,
            "load_compressed_s": statistics.median(times["load_compressed"]),
            "from_pretrained_s": statistics.median(times["from_pretrained"]),
        }
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", help="a dense transformers folder to compress and load (e.g. SmolLM2-135M)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--real-repeats", type=int, default=3)
    args = p.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, auto in AUTO.items():
            model, inputs = _tiny(kind)
            svdlora.compress(model, budget=0.5, submatrices=2, progress=False)
            folder = svdlora.save_compressed(model, Path(tmp) / kind)
            rows[kind] = {
                "auto_class": auto,
                "budget": 0.5,
                "submatrices": 2,
                **measure(folder, auto, inputs, args.repeats),
            }
            print(kind, rows[kind], flush=True)
        if args.real:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.real, dtype=torch.float32)
            svdlora.compress(model, budget=0.5, submatrices=3, progress=False)
            folder = svdlora.save_compressed(model, Path(tmp) / "real", source=args.real)
            del model
            inputs = {"input_ids": torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))}
            rows[Path(args.real).name] = {
                "auto_class": "AutoModelForCausalLM", "budget": 0.5, "submatrices": 3,
                **measure(folder, "AutoModelForCausalLM", inputs, args.real_repeats),
            }  # fmt: skip
            print(Path(args.real).name, rows[Path(args.real).name], flush=True)
    command = "OMP_NUM_THREADS=1 python -m benchmarks.from_pretrained " + " ".join(argv or sys.argv[1:])
    path = write_results("from_pretrained", {"command": command, "rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
