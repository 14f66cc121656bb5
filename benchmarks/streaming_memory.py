"""Peak memory of `svdlora compress --stream` on a synthetic Llama-shaped checkpoint larger than the limit.

    OMP_NUM_THREADS=1 python -m benchmarks.streaming_memory --workdir /tmp/stream-bench \
        [--layers 9] [--limit-gb 3] [--json out.json] [--keep] [--without-stream-flag]
        [--checkpoint FOLDER] [--compare]

Builds a random float32 Llama-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, vocab
32000; 9 layers = 8.3 GB) in ~1 GB safetensors shards with an index, then runs the CLI in a
child process whose address space is capped with RLIMIT_AS (`ulimit -v`), and reports its
peak RSS (ru_maxrss of the child) against the target: the largest input shard + one decoder
layer's weights + 300 MB. The SVD is randomized (`--svd randomized --no-svd-reference`,
budget 0.1) so the run takes minutes on 2 cores; the memory bound does not depend on it.
The checkpoint is deleted at the end unless --keep. With --without-stream-flag the command is
the plain one (no --stream): the CLI must see that the model does not fit and stream by itself.
--checkpoint compresses a given folder instead (e.g. SmolLM2-135M), --compare also runs the
command in memory without a limit and compares the weight files.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

GB = 1024**3


def llama_tensors(layers: int, hidden: int, mlp: int, vocab: int):
    """(name, shape) in checkpoint order."""
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{name}.weight", (hidden, hidden)
        yield f"{p}.mlp.gate_proj.weight", (mlp, hidden)
        yield f"{p}.mlp.up_proj.weight", (mlp, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, mlp)
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def build(folder: Path, layers: int, shard_bytes: int, hidden=4096, mlp=11008, vocab=32000) -> dict:
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in llama_tensors(layers, hidden, mlp, vocab):
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        if current and size + t.numel() * 4 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 4
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, largest = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        largest = max(largest, (folder / name).stat().st_size)
        weight_map.update(dict.fromkeys(tensors, name))
        tensors.clear()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    layer_bytes = (4 * hidden * hidden + 3 * hidden * mlp) * 4
    return {
        "checkpoint_bytes": total,
        "shards": len(shards),
        "largest_shard_bytes": largest,
        "layer_bytes": layer_bytes,
    }


def describe(folder: Path) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    return {
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "shards": len(files),
        "largest_shard_bytes": max(f.stat().st_size for f in files),
        "layer_bytes": (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size) * 4,
    }


def run_limited(cmd: list[str], limit_bytes: int) -> dict:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    start = time.perf_counter()
    proc = subprocess.run(cmd, preexec_fn=cap, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # this is the largest child so far
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "stderr_tail": proc.stderr[-800:],
        "stderr_head": proc.stderr[:2000],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--limit-gb", type=float, default=3.0)
    p.add_argument("--budget", default="0.1")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--without-stream-flag",
        action="store_true",
        help="run the plain command (no --stream, --calibration none): the CLI must see that the model does not "
        "fit under the limit and stream by itself (svdlora.memory)",
    )
    p.add_argument("--checkpoint", help="compress this local folder instead of building one (it is never deleted)")
    p.add_argument(
        "--compare", action="store_true", help="also run the same command in memory, unlimited: are the files equal?"
    )
    args = p.parse_args(argv)
    work = Path(args.workdir)
    src, out = Path(args.checkpoint) if args.checkpoint else work / "checkpoint", work / "compressed"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if (src / "config.json").exists():  # given, or kept from an earlier run (--keep): measure it again
        info = describe(src)
    else:
        info = build(src, args.layers, int(args.shard_gb * GB))
    build_seconds = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "svdlora", "compress", str(src), "-o", str(out)]
    cmd += ["--calibration", "none"] if args.without_stream_flag else ["--stream"]
    cmd += ["--budget", args.budget, "--svd", "randomized", "--no-svd-reference", "--max-shard-size", "1GB"]
    cmd += ["--no-progress"]
    result = run_limited(cmd, int(args.limit_gb * GB))
    target = info["largest_shard_bytes"] + info["layer_bytes"] + 300 * 1024**2
    stderr_head = result.pop("stderr_head")
    row = {**info, "build_seconds": build_seconds, "limit_bytes": int(args.limit_gb * GB), **result}
    row["target_bytes"] = target
    row["command"] = cmd[1:]
    said = [line for line in stderr_head.splitlines() if "streaming it instead" in line]
    row["streamed_by_itself"] = said[0] if said else None
    row["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else None
    print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}, indent=2))
    print(
        f"checkpoint {info['checkpoint_bytes'] / GB:.2f} GiB in {info['shards']} shards (largest "
        f"{info['largest_shard_bytes'] / GB:.2f} GiB); RLIMIT_AS {args.limit_gb} GiB; exit {result['returncode']} "
        f"in {result['seconds']:.0f} s; peak RSS {result['peak_rss_bytes'] / GB:.2f} GiB vs target "
        f"{target / GB:.2f} GiB (largest shard + one layer {info['layer_bytes'] / GB:.2f} GiB + 300 MiB)"
    )
    if args.without_stream_flag:
        print(f"without --stream: {row['streamed_by_itself'] or 'the CLI did not choose to stream'}")
    if args.compare and out.exists():
        in_memory = work / "in-memory"
        shutil.rmtree(in_memory, ignore_errors=True)
        plain = [c for c in cmd if c != "--stream"] + ["--no-stream"]
        plain[plain.index(str(out))] = str(in_memory)
        compared = subprocess.run(plain, capture_output=True, text=True)
        same = compared.returncode == 0 and all(
            f.read_bytes() == (in_memory / f.name).read_bytes() for f in out.glob("*.safetensors")
        )
        row["in_memory_files_equal"] = same
        print(f"in memory, unlimited (exit {compared.returncode}): weight files {'equal' if same else 'DIFFER'}")
        shutil.rmtree(in_memory, ignore_errors=True)
    if result["returncode"]:
        print(result["stderr_tail"])
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    if not args.keep and not args.checkpoint:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
