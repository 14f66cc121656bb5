"""`svdlora compress MODEL --budget B --submatrices N --output DIR`: its flags (the run: ``compress_run``)."""

from __future__ import annotations

import argparse

from ..config import SVD_METHODS
from . import options
from .calibration_flags import add_calibration_flags

EXAMPLES = """examples:
  svdlora compress gpt2 --budget 0.5 --submatrices 3 --output out/gpt2-svd
  svdlora compress gpt2 --budget 0.8 --calibration wiki.valid.txt --heal-steps 200 --output out/gpt2-80
  svdlora compress gpt2 --budget 0.8 --method svd --calibration none --output out/gpt2-plain
  svdlora compress gpt2 --budget 0.25 --submatrices 2 --stage-dtypes full-int4,int8 --output out/gpt2-q
  svdlora compress ./my-vit --budget 0.3 --exclude 're:.*attention.*' --output out/vit-svd
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="factorize a model's Linear/Conv1D layers and save the folder",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (e.g. gpt2) or local folder of a transformers model")
    p.add_argument("-o", "--output", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--budget",
        type=options.budget,
        default=None,  # None, not 0.5: a budget given together with --rank is refused, not ignored
        help="factors hold at most this fraction of the targeted parameters, in (0, 1] (default 0.5); "
        "pivoted factors count their int64 pivot indices too",
    )
    p.add_argument(
        "--submatrices",
        type=options.positive_int("submatrices"),
        default=1,
        help="residual SVD stages per matrix (default 1)",
    )
    p.add_argument(
        "--rank",
        type=options.positive_int("rank"),
        default=None,
        help="fixed total rank per matrix instead of a budget",
    )
    p.add_argument(
        "--stage-dtypes",
        default=None,
        metavar="DTYPES",
        help="how each stage is stored, comma-separated, the last repeated up to --submatrices: float32, "
        "float16, bfloat16, int8, int4 (group 128), int4g64, int4g32, or full-int8 / full-int4 as a full-rank "
        "quantized first stage; the budget then counts bytes (default: every stage in the model's dtype)",
    )
    options.add_pivot_flag(p)
    p.add_argument(
        "--rank-multiple",
        type=options.positive_int("rank-multiple"),
        default=1,
        metavar="N",
        help="round each matrix's rank down to a multiple of N; a rank below N is kept as it is (8 for GPU "
        "inference: aligned factors decode faster with cuBLAS; the budget still holds)",
    )
    options.add_patterns_flag(p, "--include", f"only these modules: {options.MODULE_PATTERNS}")
    options.add_patterns_flag(p, "--exclude", "leave these modules dense (patterns as in --include)")
    options.add_compress_head_flag(
        p,
        "also factorize the output head / layers tied to embeddings (a head tied to the input embedding: "
        "the folder grows by its factors, decoding reads fewer bytes)",
    )
    p.add_argument(
        "--svd",
        "--svd-method",
        dest="svd_method",
        choices=SVD_METHODS,
        default="exact",
        help="exact (the default: reproducible, optimal factors), randomized (Halko et al., oversampling "
        "8, 2 power iterations), or auto: randomized where rank <= min(out, in)/4 and min(out, in) >= 1024, "
        "exact elsewhere",
    )
    p.add_argument(
        "--device",
        dest="svd_device",
        default=None,
        help="run the SVD on this device, e.g. cuda (a matrix whose GPU solver fails is redone on the CPU). In "
        "memory the model and its calibration stay on the CPU; with --stream --calibration DATA the calibration's "
        "block passes run on the device too, one block there at a time. Under torchrun, cuda means each "
        "process's own GPU (LOCAL_RANK). Not used with --stage-dtypes (its stages are factorized where the "
        "weights are)",
    )
    p.add_argument(
        "--no-svd-reference",
        dest="svd_reference",
        action="store_false",
        help="skip computing the exact SVD's error for randomized factors of plain SVD (`info`'s 'vs exact'); "
        "exact factors, calibrated methods and --stage-dtypes compute none, so there it changes nothing",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read the checkpoint tensor by tensor and write the output shard by shard (a local safetensors "
        "folder, or a hub id whose config, safetensors and tokenizer files are downloaded first; memory: one "
        "matrix and its SVD), the same bytes as in memory with --calibration none. Automatic "
        "under torchrun / accelerate launch, where the matrices are split over the processes, and where the model "
        "and its factors would not fit in memory (the available memory, the memory cgroup, ulimit -v; said on "
        "stderr; --no-stream loads it anyway). With --calibration "
        "DATA (a causal LM's text) it calibrates one decoder block at a time, every method and allocation as in "
        "memory (fisher, kfac and global allocation by a backward pass block by block, keeping every block's "
        "inputs on disk beside the output until it is done; --method whiten --allocation uniform needs one "
        "forward pass and no disk; under torchrun each process runs its share of the windows, the statistics summed "
        "over the processes); the default --calibration auto falls back to plain SVD (said on stderr), "
        "--calibration self is refused",
    )
    options.add_max_shard_size_flag(p)
    add_calibration_flags(p)
    p.add_argument(
        "--dtype", type=options.dtype_name, default=None, help="load the model in this dtype (default: as stored)"
    )
    options.add_overwrite_flag(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")
    p.add_argument(
        "--eval",
        type=options.data_name("eval"),
        metavar="DATA",
        help="evaluate the result on DATA (as `svdlora eval`): printed, and written into the card",
    )
    p.add_argument(
        "--references",
        metavar="FILE",
        help="with --eval on a translation model: reference file, one sentence per line (as `svdlora eval`)",
    )
    p.add_argument("--eval-limit", type=options.positive_int("eval-limit"), help="only the first N windows/examples")
    options.add_dataset_flags(p, "dataset options of --eval DATA (as `svdlora eval`; calibration data reads none)")
    options.add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .compress_run import run  # torch and transformers: imported once the flags are known good

    return run(args)
