"""`svdlora eval MODEL --data D [--task T] [--baseline B]`: quality, speed and size, side by side."""

from __future__ import annotations

import argparse
import json
import sys

from ..choices import RUNTIMES, TASKS
from ..io.outputs import check_output_file, write_file_atomic
from . import options

EXAMPLES = """examples:
  svdlora eval out/gpt2-svd --task text-generation --data wiki.test.txt --baseline gpt2
  svdlora eval out/vit-svd --task image-classification --data cifar10/test --baseline my-vit
  svdlora eval out/marian-svd --task translation --data test.de --references test.en --baseline my-marian
  svdlora eval out/gpt2-svd --task text-generation --data wikitext --data-config wikitext-2-raw-v1 --split test

defaults: float32; device cuda when present else cpu; batch size 1 window (text), 32 images,
16 sentences (translation); windows of the model's context (at most 1024) every max-length/2
tokens; beam search with 4 beams and at most 128 new tokens (fewer where the models have fewer decoder
positions).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure a model (and its baseline): perplexity / accuracy / BLEU, speed, size, memory",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="svdlora folder, dense model folder or hub id")
    p.add_argument(
        "--task",
        choices=TASKS,
        help="default: the one the model fits (a causal LM: text-generation, an image classifier: "
        "image-classification, an encoder-decoder that generates: translation)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="text file / image folder (one subfolder per class) / source-sentence file, "
        "or a datasets dataset (hub name, save_to_disk folder, .json/.csv/.parquet)",
    )
    p.add_argument("--baseline", help="the original model to compare with (folder or hub id)")
    p.add_argument("--references", help="translation: reference file, one sentence per line")
    options.add_dataset_flags(p)
    t = p.add_argument_group("task settings")
    t.add_argument(
        "--max-length",
        type=options.positive_int("max-length"),
        help="text: tokens per window (default: the model's context, at most 1024)",
    )
    t.add_argument("--stride", type=options.positive_int("stride"), help="text: window step (default: max-length/2)")
    t.add_argument("--num-beams", type=options.positive_int("num-beams"), help="translation: beam width (default 4)")
    t.add_argument(
        "--max-new-tokens",
        type=options.positive_int("max-new-tokens"),
        help="translation: longest output (default 128, or the models' decoder positions where fewer)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--limit",
        type=options.positive_int("limit"),
        help="only the first N windows / images / sentences (quick checks)",
    )
    r.add_argument(
        "--batch-size",
        type=options.positive_int("batch-size"),
        help="windows / images / sentences per forward (default 1 / 32 / 16)",
    )
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    r.add_argument("--dtype", type=options.dtype_name, help="float32 (default), bfloat16 or float16, for both models")
    r.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="svdlora folders (the model, and the baseline when it is one): keep factors as stored (default), "
        "pairs (pivoted layers as plain factor pairs), merge them, or auto: per layer the fastest layout measured "
        "on the device for one token per call (auto-graphs: timed as CUDA-graph replays, for compiled decoding)",
    )
    r.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inputs = [args.model, args.baseline, args.data, args.references]
    json_path = check_output_file(args.json, inputs) if args.json else None  # before the evaluation
    from ..evaluation import evaluate, format_table  # torch: imported once the flags are known good

    result = evaluate(
        args.model,
        task=args.task,
        data=args.data,
        baseline=args.baseline,
        references=args.references,
        **options.dataset_options(args),
        max_length=args.max_length,
        stride=args.stride,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        runtime=args.runtime,
        progress=args.progress,
    )
    print(format_table(result))
    if json_path is not None:
        write_file_atomic(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    return 0
