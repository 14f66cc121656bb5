"""torchrun splits the matrices over processes; killed runs leave no folder that looks complete."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from svdlora import load_compressed
from svdlora.distributed import Context, assign
from svdlora.io.outputs import TMP_TAG

from .eval_helpers import word_text, word_tokenizer
from .test_blockwise import WORDS, tiny_benchmark_inputs
from .test_streaming import tied_llama, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"svdlora compress \[rank \d/2\]: error: ")  # a launched process's error, its rank named

# Runs the CLI with factorize() patched to SIGKILL its own process at the 3rd matrix (on rank
# DIE_RANK only): a crash no cleanup code can catch, as an OOM kill or a lost node would be.
# Each process that exits writes how many matrices it factorized to rank-N in COUNT_DIR.
DYING = """
import atexit, os, signal, sys
from pathlib import Path
import svdlora.streaming.jobs as jobs
original, calls = jobs.factorize, []
rank = os.environ.get("RANK", "0")
atexit.register(lambda: Path(os.environ["COUNT_DIR"], f"rank-{rank}").write_text(str(len(calls))))
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and rank == os.environ["DIE_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
jobs.factorize = dying
from svdlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(args, tmp_path, world_size=1, die_rank=None):
    """The CLI's compress (under the DYING script where ``die_rank`` is given; -1: no rank dies)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DIE_RANK": str(die_rank)}
    env["COUNT_DIR"] = str(tmp_path)
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    cmd = [*launcher, str(script) if die_rank is not None else "-m", *([] if die_rank is not None else ["svdlora"])]
    cmd += ["compress", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def compress_args(base, out):
    return [base, "-o", out, "--budget", "0.5", "--submatrices", "2", "--max-shard-size", "30KB", "--no-progress"]


def looks_complete(folder: Path) -> bool:
    return folder.exists() and (folder / "svdlora_config.json").exists()


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base"
    tied_llama().save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.mark.slow
def test_two_processes_write_the_single_process_bytes(base, tmp_path):
    one = run([*compress_args(base, tmp_path / "one"), "--stream"], tmp_path, die_rank=-1)
    assert one.returncode == 0, one.stderr
    matrices = int((tmp_path / "rank-0").read_text())
    two = run(compress_args(base, tmp_path / "two"), tmp_path, world_size=2, die_rank=-1)
    assert two.returncode == 0, two.stderr
    shares = [int((tmp_path / f"rank-{r}").read_text()) for r in (0, 1)]  # the work is split, not repeated
    assert min(shares) > 0 and sum(shares) == matrices, (shares, matrices)
    assert weight_bytes(tmp_path / "one") == weight_bytes(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "svdlora_config.json").read_text())["world_size"] == 2
    load_compressed(tmp_path / "two", device="cpu")


@pytest.mark.slow
def test_accelerate_launch_splits_the_work_as_torchrun_does(base, tmp_path):
    """`accelerate launch` starts its processes through torch.distributed.run (here on CPUs, gloo)."""
    one = run([*compress_args(base, tmp_path / "one"), "--stream"], tmp_path)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "svdlora"]
    two = subprocess.run(
        [*launch, "compress", *map(str, compress_args(base, tmp_path / "two"))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert weight_bytes(tmp_path / "one") == weight_bytes(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "svdlora_config.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--method", "whiten", "--allocation", "uniform"]], ids=["default", "whiten"])
def test_two_processes_calibrate_as_one(base, tmp_path, flags):
    """Each rank runs its share of the windows and the statistic sums are added over the ranks:
    the same ranks as one process, the same weights up to the order of the float64 sums."""
    word_tokenizer(WORDS).save_pretrained(base)
    (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
    args = ["--calibration", tmp_path / "text.txt", "--calibration-samples", "5", "--calibration-length", "16"]
    one = run([*compress_args(base, tmp_path / "one"), "--stream", *args, *flags], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run([*compress_args(base, tmp_path / "two"), *args, *flags], tmp_path, world_size=2)
    assert two.returncode == 0, two.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    reports = [json.loads((tmp_path / f / "svdlora_config.json").read_text())["report"] for f in ("one", "two")]
    assert [m.get("ranks") for m in reports[0]["modules"]] == [m.get("ranks") for m in reports[1]["modules"]]
    assert reports[0]["calibration"] == reports[1]["calibration"]  # all 5 windows, not one rank's
    merged = [load_compressed(tmp_path / f, device="cpu", runtime="merged").state_dict() for f in ("one", "two")]
    for key, weight in merged[0].items():
        torch.testing.assert_close(merged[1][key], weight, rtol=1e-5, atol=1e-6 * weight.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--method", "whiten", "--allocation", "uniform"]], ids=["default", "whiten"])
def test_two_processes_show_each_progress_bar_once(base, tmp_path, flags):
    """Whitening's bar over the copied tensors ran on every rank: two processes drew two bars."""
    word_tokenizer(WORDS).save_pretrained(base)
    (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
    args = [base, "-o", tmp_path / "out", "--budget", "0.5", "--calibration", tmp_path / "text.txt"]
    two = run([*args, "--calibration-samples", "4", "--calibration-length", "16", *flags], tmp_path, world_size=2)
    assert two.returncode == 0, two.stderr
    started = Counter(re.findall(r"([a-z][a-z ,:]*?):\s+0%\|", two.stderr))  # tqdm's first frame of each bar
    assert started and set(started.values()) == {1}, started


@pytest.mark.slow
def test_distributed_calibration_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from benchmarks import distributed_calibration

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    argv = [*tiny_benchmark_inputs(tmp_path), "--work", str(tmp_path / "work"), "--samples", "2"]
    distributed_calibration.main([*argv, "--json", str(tmp_path / "res" / "dist.json")])
    rows = json.loads((tmp_path / "res" / "dist.json").read_text())["rows"]
    assert set(rows) == {"default", "whiten"}
    for row in rows.values():
        assert row["same_ranks"] and row["max_rel_diff"] < 1e-5
        assert row["1 process"]["perplexity"] == pytest.approx(row["2 processes"]["perplexity"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "calibrated"), [(1, False), (2, False), (2, True)])
def test_killed_run_leaves_nothing_complete_and_rerun_succeeds(base, tmp_path, world_size, calibrated):
    out = tmp_path / "out"
    args = [*compress_args(base, out), "--stream"]
    if calibrated:  # killed while factorizing, after the block-by-block backward filled the scratch
        word_tokenizer(WORDS).save_pretrained(base)
        (tmp_path / "text.txt").write_text(word_text(WORDS, 600))
        args += ["--calibration", tmp_path / "text.txt", "--calibration-samples", "4", "--calibration-length", "16"]
    killed = run(args, tmp_path, world_size=world_size, die_rank=world_size - 1)
    assert killed.returncode != 0
    if world_size == 1:
        assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and not looks_complete(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".out{TMP_TAG}")]
    assert not any(looks_complete(p) for p in leftovers)  # partial, and says so
    if world_size == 1:
        assert leftovers  # SIGKILL: no cleanup ran, the hidden temporary folder stays
    again = run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert looks_complete(out)
    assert not any("scratch" in p.name for p in out.iterdir())
    load_compressed(out, device="cpu")


def test_assign_balances_and_is_deterministic():
    costs = [9, 1, 1, 1, 4, 4]
    owner = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [10, 10] and assign(costs, 2) == owner
    assert assign(costs, 1) == [0] * 6


def test_assign_balances_each_block_and_the_whole():
    """A calibrated run waits for every rank at each block: each block's work is spread on its own."""
    costs, blocks = [4, 2, 2] * 2 + [3, 3], ["a"] * 3 + ["b"] * 3 + ["c", "d"]
    owner = assign(costs, 2, blocks)
    for block in "ab":  # longest first over all jobs would give block a 6 and 2
        loads = [sum(c for c, o, g in zip(costs, owner, blocks, strict=True) if o == r and g == block) for r in (0, 1)]
        assert loads == [4, 4]
    assert owner[-2:] == [0, 1]  # a tie goes to the rank with less work so far
    assert assign([9, 1, 1, 1, 4, 4], 2, [None] * 6) == assign([9, 1, 1, 1, 4, 4], 2)


def test_each_rank_gets_a_contiguous_share_of_the_windows():
    shares = [Context(rank, 3).share(list(range(8))) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert Context().share([1, 2]) == [1, 2]


def test_a_collective_that_fails_because_a_peer_stopped_says_so(monkeypatch):
    """A rank whose peer died (bad input it alone read, a crash) got gloo's RuntimeError, which the CLI
    called 'a bug in svdlora'; it is one line pointing at the other process (exit status 2)."""
    import torch.distributed as dist

    from svdlora.errors import SvdloraError

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. More."

    def closed(*args, **kwargs):
        raise RuntimeError(gloo)

    for name in ("barrier", "broadcast_object_list", "all_gather_object", "all_reduce"):
        monkeypatch.setattr(dist, name, closed)
    ctx = Context(rank=1, world_size=2)
    for call in (
        ctx.barrier,
        lambda: ctx.broadcast("x"),
        lambda: ctx.gather("x"),
        lambda: ctx.all_reduce_sum([torch.ones(1)]),
    ):
        with pytest.raises(
            SvdloraError, match=r"another process of this run stopped.*\(Connection closed by peer \[127"
        ):
            call()


@pytest.mark.parametrize(
    "samples,advice", [(1, "--calibration-samples 2 or more"), (64, "shorter --calibration-length")]
)
def test_too_few_windows_for_the_processes_says_what_helps(monkeypatch, samples, advice):
    """More samples cannot help where the text itself ran out of windows: the advice says which it is."""
    import svdlora.calibration_data
    from svdlora.config import CompressionConfig
    from svdlora.errors import SvdloraError
    from svdlora.streaming import pipeline

    monkeypatch.setattr(pipeline.blockwise, "check", lambda *args: None)
    monkeypatch.setattr(svdlora.calibration_data, "calibration_batches", lambda *args, **kwargs: [{"input_ids": 0}])
    plan = type("Plan", (), {"model": None, "hf_config": None, "target_names": []})()
    config = CompressionConfig(budget=0.5, calibration_samples=samples)
    with pytest.raises(SvdloraError, match=f"1 calibration windows for 2 processes: .*{advice}"):
        pipeline._calibration_batches(plan, "m", "text.txt", object(), config, Context(0, 2), False)


def test_each_rank_takes_its_own_share_of_the_jobs_and_together_all_of_them(base):
    from svdlora import CompressionConfig
    from svdlora.distributed import job_key, jobs_of, owners
    from svdlora.streaming import plan

    p = plan(base, CompressionConfig(budget=0.5, submatrices=2))
    owner = owners(p, 2)
    shares = [jobs_of(p, rank, owner) for rank in (0, 1)]
    keys = [{job_key(j) for j in share} for share in shares]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {job_key(j) for j in p.jobs}
    factorized = [sum(kind == "factorize" for kind, _, _ in share) for share in shares]
    assert min(factorized) > 0 and sum(factorized) == sum(kind == "factorize" for kind, _, _ in p.jobs)


@pytest.fixture
def rank_0_of_two(monkeypatch):
    """This process as rank 0 of torchrun's two (no process group: for refusals before any collective)."""
    from svdlora import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "context", lambda: Context(0, 2))


@pytest.mark.parametrize(
    ("flags", "refused"),
    [(["--heal-steps", "10"], "healing cannot stream"), (["--stage-dtypes", "int8"], "--stage-dtypes cannot stream")],
    ids=["heal", "stage-dtypes"],
)
def test_under_a_launcher_the_way_to_memory_is_one_process_not_dropping_stream(
    base, tmp_path, capsys, rank_0_of_two, flags, refused
):
    """A launcher's run streams without --stream: a refusal that said 'drop --stream' named a flag not given."""
    from svdlora.cli import main

    assert main(["compress", str(base), "-o", str(tmp_path / "out"), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert refused in err and "run one process, without torchrun" in err and "--stream" not in err, err
    assert main(["compress", str(base), "-o", str(tmp_path / "out"), *flags, "--stream", "--no-progress"]) == 2
    err = capsys.readouterr().err  # the flag given: dropping it alone would stream again under the launcher
    assert refused in err and "drop --stream and run one process, without torchrun" in err, err


def _checkpoint_without_safetensors(base: Path) -> None:
    for weights in base.glob("*.safetensors*"):
        weights.unlink()
    torch.save({}, base / "pytorch_model.bin")


def _layers_out_of_the_checkpoint(base: Path) -> None:
    """One weight gone from its shard and the index (an index leaving whole shards out is refused earlier,
    as incomplete, by every reader: test_a_checkpoint_index_that_leaves_out_a_shard_is_refused_as_incomplete)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((base / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = base / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "refused"),
    [
        (_checkpoint_without_safetensors, "streaming reads safetensors checkpoints only"),
        (_layers_out_of_the_checkpoint, "has no tensor for model.layers.0"),
    ],
    ids=["no-safetensors", "missing-weight"],
)
def test_under_a_launcher_a_checkpoint_streaming_cannot_read_points_to_one_process(
    base, tmp_path, capsys, rank_0_of_two, monkeypatch, damage, refused
):
    """Refusals worded 'compress without --stream' kept that wording under a launcher, where the run streams
    without the flag (only 'drop --stream' was reworded)."""
    from svdlora.cli import main

    monkeypatch.setattr(Context, "broadcast", lambda self, obj: obj)  # rank 0's folder: to the plan's refusals
    damage(base)
    args = ["compress", str(base), "-o", str(tmp_path / "out"), "--calibration", "none", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert refused in err and "run one process, without torchrun" in err and "--stream" not in err, err


def test_every_refusal_points_to_memory_in_the_one_wording_a_launched_run_rewords():
    """A refusal that wrote its own way to memory ('compress without --stream') escaped the launcher's wording:
    no literal in svdlora/ says it but errors.IN_MEMORY, which every StreamingRefusal fills in."""
    from svdlora.errors import IN_MEMORY

    own = re.compile(r"(drop|without|compress in memory)\W+--stream", re.IGNORECASE)
    found = []
    for path in sorted((ROOT / "svdlora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and own.search(node.value):
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value))
    assert [value for _, value in found] == [IN_MEMORY] and found[0][0].startswith("svdlora/errors.py:"), found


@pytest.mark.parametrize("launcher", ["--stream", "torchrun"])
def test_a_streamed_run_without_data_is_not_pointed_at_calibration_self(base, tmp_path, capsys, request, launcher):
    """'needs calibration data: pass --calibration DATA (or 'self' ...)', and 'self' was then refused."""
    from svdlora.cli import main

    if launcher == "torchrun":
        request.getfixturevalue("rank_0_of_two")
    stream = ["--stream"] if launcher == "--stream" else []
    args = ["compress", str(base), "-o", str(tmp_path / "out"), "--method", "whiten", "--calibration", "none"]
    assert main([*args, *stream]) == 2
    err = capsys.readouterr().err
    assert "needs calibration data: pass --calibration DATA" in err and "self" not in err, err


# Rank 0 fails at its first matrix; rank 1 writes its first tensor only once rank 0's cleanup removed the
# temporary folder, and rank 0 exits only after rank 1 (else torchrun could stop rank 1 before it writes).
FAILING_FIRST = """
import atexit, glob, os, sys, time
from pathlib import Path
import svdlora.streaming.jobs as jobs
from svdlora.errors import SvdloraError
from svdlora.streaming.pipeline import ShardedWriter
original, output = ShardedWriter.write, sys.argv[sys.argv.index("-o") + 1]
marker = Path(os.path.dirname(output), "rank-1-exited")
def wait_for_rank_1():
    for _ in range(400):
        if marker.exists():
            return
        time.sleep(0.05)
atexit.register(wait_for_rank_1 if os.environ["RANK"] == "0" else marker.touch)
def fail(*args, **kwargs):
    raise SvdloraError("rank 0's own error")
def write(*args, **kwargs):
    while glob.glob(f"{os.path.dirname(output)}/.{os.path.basename(output)}.svdlora-tmp-*"):
        time.sleep(0.05)
    return original(*args, **kwargs)
if os.environ["RANK"] == "0":
    jobs.factorize = fail
else:
    ShardedWriter.write = write
from svdlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~11 s (two processes starting on two cores)
def test_a_rank_whose_folder_rank_0_removed_points_at_rank_0_not_at_the_disk(base, tmp_path):
    """Rank 0 stops, and its cleanup removes the temporary folder the other ranks write into: their write
    failed on a missing file, said as 'nothing was written; free space or fix permissions and retry'."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_FIRST)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = tmp_path / "out"
    done = subprocess.run(
        [*launch, "compress", str(base), "-o", str(out), "--budget", "0.5", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 2 and sum("rank 0's own error" in line for line in errors) == 1, done.stderr
    rank_1 = next(line for line in errors if "rank 0's own error" not in line)  # the processes print in any order
    assert "another process of this run stopped" in rank_1 and "free space" not in rank_1, errors
    assert not out.exists() and not list(tmp_path.glob(f".out{TMP_TAG}*"))


@pytest.mark.parametrize("command", ["export", "eval", "convert-gguf", "extract", "sweep", "info"])
def test_a_command_that_does_not_split_its_work_is_refused_under_a_launcher(
    tmp_path, monkeypatch, capsys, joining_as_rank_1, command
):
    """torchrun --nproc_per_node 2 svdlora export ...: both processes exported, one wrote the folder and
    the other failed on it, leaving an 'exp.svdlora-finished-...' folder beside it."""
    from svdlora.cli import build_parser, main

    required = {
        "export": ["x", "--dense", "-o", "o"],
        "eval": ["x", "--data", "d"],
        "convert-gguf": ["x.gguf", "-o", "o"],
        "extract": ["--base", "b", "--tuned", "t", "-o", "o", "--rank", "2"],
        "sweep": ["x", "--data", "d", "-o", "o"],
        "info": ["x"],
    }
    build_parser().parse_args([command, *required[command]])  # the flags parse: the launcher is what is refused
    monkeypatch.chdir(tmp_path)
    assert main([command, *required[command]]) == 2
    err = capsys.readouterr().err
    assert f"svdlora {command} runs as one process" in err and "without torchrun" in err, err


def test_under_a_launcher_each_error_line_names_its_rank(tmp_path, monkeypatch, capsys, joining_as_rank_1):
    """An error every process hits was printed once per process in the same words: each line now says whose it
    is (an error of one rank only stays its own line); a single process's line is as before."""
    from svdlora.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["info", "x"]) == 2
    assert capsys.readouterr().err.startswith("svdlora info [rank 1/2]: error: svdlora info runs as one process")
    with pytest.raises(SystemExit):  # a bad flag: argparse's line
        main(["compress", "x", "-o", "o", "--budget", "half"])
    assert capsys.readouterr().err.startswith("svdlora compress [rank 1/2]: error: argument --budget")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["info", "missing"]) == 2
    assert capsys.readouterr().err.startswith("svdlora info: error: ")


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_another_rank_does_not_say_nothing_was_written(base, tmp_path, monkeypatch, capsys, joining_as_rank_1, error):
    """Only rank 0 writes the output and records what it wrote: rank 1's Ctrl-C or write error said 'nothing was
    written' where rank 0 may have written the folder. It leaves that to rank 0's line now."""
    import svdlora.cli.compress_run as compress_run
    from svdlora.cli import main

    def stopped(*args):
        raise error

    monkeypatch.setattr(compress_run, "svd_device", stopped)
    argv = ["compress", str(base), "-o", str(tmp_path / "out"), "--calibration", "none", "--no-progress"]
    for rank, said in (("1", "rank 0 writes the output and says what was written"), ("0", "nothing was written")):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) in (2, 130)
        assert said in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("size", ["two", "", "²"])  # "²": isdigit() but not int()
def test_a_world_size_that_is_no_count_is_no_launcher(tmp_path, monkeypatch, capsys, size):
    """distributed.launched() read WORLD_SIZE with int() and the CLI's error lines with isdigit(): a value that is
    no count failed every command on int()'s ValueError, as a bug in svdlora (exit 1). One launched() serves both."""
    from svdlora import distributed
    from svdlora.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", size)
    monkeypatch.setenv("RANK", "0")
    assert not distributed.launched()
    assert main(["info", "missing"]) == 2
    assert capsys.readouterr().err.startswith("svdlora info: error: ")


# Rank 1 refuses its own setting (as a rank whose LOCAL_RANK has no GPU does) before any work.
REFUSING_EARLY = """
import os, sys
import svdlora.cli.compress_run as compress_run
from svdlora.errors import SvdloraError
def refuse(name):
    raise SvdloraError("rank 1's own refusal")
if os.environ["RANK"] == "1":
    compress_run.svd_device = refuse
from svdlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_refuses_before_the_others_joined_stops_them_at_once(base, tmp_path):
    """Rank 0 went on to join the process group and waited there for rank 1, which had stopped: deaf to
    torchrun's SIGTERM in that call, it was killed after 30 s without a word of its own (~7 s here, two
    processes starting; 40 s before)."""
    script = tmp_path / "refusing.py"
    script.write_text(REFUSING_EARLY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(
        [*launch, "compress", str(base), "-o", str(tmp_path / "out"), "--budget", "0.5", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = sorted(line for line in done.stderr.splitlines() if ERROR_LINE.match(line))  # rank 0's line first
    assert len(errors) == 2 and errors[0].startswith(
        "svdlora compress [rank 0/2]: error: another process of this run stopped"
    ), done.stderr
    assert errors[1].startswith("svdlora compress [rank 1/2]: error: rank 1's own refusal"), done.stderr
    assert "forcefully" not in done.stderr


@pytest.fixture
def joining_as_rank_1(monkeypatch):
    """What this process, as rank 1 of two, passes init_process_group (which is not called)."""
    import torch.distributed as dist

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return joined


def _timing_out(monkeypatch) -> None:
    """Collectives (a barrier) that gloo ends for the wait it was given."""
    import torch.distributed as dist

    def silent(*args, **kwargs):
        raise RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 86400000ms for recv")

    monkeypatch.setattr(dist, "barrier", silent)


def test_a_process_waits_hours_for_the_others_and_a_timeout_is_not_called_a_stop(monkeypatch, joining_as_rank_1):
    """torch's default let a process wait 30 minutes at a collective: the others gave up while rank 0
    downloaded a large hub checkpoint, or finished a longer share, saying 'another process ... stopped'."""
    from datetime import timedelta

    from svdlora import distributed
    from svdlora.errors import SvdloraError

    assert distributed.context() == Context(1, 2)
    assert joining_as_rank_1["timeout"] >= timedelta(hours=12), joining_as_rank_1
    _timing_out(monkeypatch)
    with pytest.raises(SvdloraError, match=r"did not answer within 24 h \(Timed out waiting") as refused:
        Context(1, 2).barrier()
    assert "stopped" not in str(refused.value)


def test_the_wait_for_the_other_processes_is_set_in_seconds_by_an_environment_variable(monkeypatch, joining_as_rank_1):
    """The 24 h wait had no override: a run whose rank 0 downloads for longer, or a cluster that wants a hung
    process ended sooner, could not change it."""
    from datetime import timedelta

    from svdlora import distributed
    from svdlora.errors import SvdloraError

    monkeypatch.setenv("SVDLORA_DISTRIBUTED_TIMEOUT", "90")
    assert distributed.context() == Context(1, 2) and joining_as_rank_1["timeout"] == timedelta(seconds=90)
    _timing_out(monkeypatch)
    with pytest.raises(SvdloraError, match=r"within 90 s .*SVDLORA_DISTRIBUTED_TIMEOUT sets the wait"):
        Context(1, 2).barrier()
    monkeypatch.setenv("SVDLORA_DISTRIBUTED_TIMEOUT", "5400")
    assert distributed.wait() == timedelta(hours=1.5)


@pytest.mark.parametrize("given", ["ten", "", "0", "-60", "nan", "inf", "1e10"])
def test_a_wait_that_is_no_number_of_seconds_is_refused_before_joining(monkeypatch, joining_as_rank_1, given):
    """A bad value must not reach init_process_group: 0 or less, or past torch's int64 nanoseconds, ends
    every collective at once; text would fail inside torch."""
    from svdlora import distributed
    from svdlora.errors import SvdloraError

    monkeypatch.setenv("SVDLORA_DISTRIBUTED_TIMEOUT", given)
    with pytest.raises(SvdloraError, match=rf"SVDLORA_DISTRIBUTED_TIMEOUT must be a wait in seconds .* got {given!r}"):
        distributed.context()
    assert not joining_as_rank_1


def test_no_stream_under_a_launcher_is_refused_not_ignored(base, tmp_path, capsys, rank_0_of_two):
    """--no-stream ('loads it anyway') under torchrun streamed without a word: the flag is refused, as it
    cannot be kept there (every process would compress the whole model into the one output)."""
    from svdlora.cli import main

    out = tmp_path / "out"
    refused = main(["compress", str(base), "-o", str(out), "--calibration", "none", "--no-stream", "--no-progress"])
    err = capsys.readouterr().err
    assert "--no-stream cannot be used under torchrun" in err and "run one process, without torchrun" in err, err
    assert refused == 2 and not out.exists()


def test_two_processes_say_that_the_calibration_is_unused_once(base, tmp_path):
    """'calibration data is not used by method 'svd' with uniform allocation' was printed by every process,
    where the run's other warnings (the plain SVD fallback, an untied head) are rank 0's alone."""
    word_tokenizer(WORDS).save_pretrained(base)
    (tmp_path / "text.txt").write_text(word_text(WORDS, 100))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "svdlora"]
    args = ["compress", str(base), "-o", str(tmp_path / "out"), "--calibration", str(tmp_path / "text.txt")]
    done = subprocess.run(
        [*launch, *args, "--method", "svd", "--allocation", "uniform", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("calibration data is not used by method 'svd'") == 1, done.stderr
