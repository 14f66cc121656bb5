"""Never destroy or fake: every bad input is one line and a non-zero exit, the user's files stay
byte-identical, nothing half-written is left behind (issue 7). All through the real entry point."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

import svdlora
from svdlora.cli import main
from svdlora.errors import SvdloraError
from svdlora.io import CONFIG_NAME, WEIGHTS_NAME
from svdlora.io.outputs import INCOMPLETE, KEPT_TAG, MARKER, OLD_TAG, TMP_TAG, _host

from .eval_helpers import word_tokenizer

WORDS = "the a man woman dog cat sits runs on in under big small red blue house tree".split()
LEFTOVER_TAGS = (TMP_TAG, OLD_TAG, ".svdlora-probe-")


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if any(tag in p.name for tag in LEFTOVER_TAGS)]


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # only the command's output: a test's own loads and saves draw transformers' bars
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # a flag value the parser refuses
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, *args, match: str) -> str:
    """Run a command that must fail with one line containing ``match``."""
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer, its compressed folder and a text file, built once."""
    root = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    tok = word_tokenizer(WORDS)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)))
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    svdlora.compress(model, budget=0.5, submatrices=2, progress=False)
    svdlora.save_compressed(model, root / "svd", source=root / "dense")
    (root / "text.txt").write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(80)))
    return root


@pytest.fixture
def work(made, tmp_path):
    """Private copies of the fixtures for a test that may be destructive."""
    for name in ("dense", "svd", "text.txt"):
        src = made / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def assert_untouched(work: Path, before: dict[str, str]) -> None:
    assert tree_hash(work) == before
    assert not leftovers(work)


# ---------------------------------------------------------------- destructive outputs
@pytest.mark.parametrize(
    "command, output, match",
    [
        ("compress", "dense", "is the input"),
        ("compress", "dense/sub", "is inside the input"),
        ("compress", ".", "is the input"),  # run from inside work/dense
        ("compress", "..", "contains the input"),
        ("compress", "link", "is a symbolic link"),
        ("compress", "text.txt", "is a file"),
        ("compress", "text.txt/out", "is a file, not a folder"),
        ("compress", "mine", "holds files svdlora did not write"),
        ("export", "svd", "is the input"),
        ("export", "svd/inner", "is inside the input"),
        ("export", "mine", "holds files svdlora did not write"),
    ],
)
def test_outputs_that_would_destroy_user_files_are_refused(work, capsys, monkeypatch, command, output, match):
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("my notes")
    (work / "link").symlink_to(work / "dense")
    monkeypatch.chdir(work / "dense")
    before = tree_hash(work)
    source = work / ("dense" if command == "compress" else "svd")
    args = ["--dense"] if command == "export" else ["--no-progress"]
    output = output if output in (".", "..") else work / output
    refused(capsys, command, source, "--output", output, "--overwrite", *args, match=match)
    assert_untouched(work, before)


def test_current_folder_is_never_replaced(work, capsys, monkeypatch):
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    before = tree_hash(work)
    refused(capsys, "compress", work / "dense", "--output", ".", "--overwrite", match="the current folder")
    assert_untouched(work, before)


def test_overwrite_replaces_only_svdlora_outputs_or_empty_folders(work, capsys):
    (work / "empty").mkdir()
    assert cli(capsys, "compress", work / "dense", "--output", work / "empty", "--overwrite", "--no-progress")[0] == 0
    assert cli(capsys, "export", work / "empty", "--dense", "--output", work / "exp")[0] == 0
    # a dense export carries svdlora's marker, so it may be replaced; a user's folder may not
    assert cli(capsys, "export", work / "svd", "--dense", "--output", work / "exp", "--overwrite")[0] == 0
    assert (work / "exp" / ".svdlora-output").is_file() and not leftovers(work)


@pytest.mark.parametrize("flag", ["--calibration", "--eval"])
def test_overwrite_never_deletes_the_data_the_run_reads(work, capsys, flag):
    """Data kept inside an earlier output counts as an input: --overwrite of that output would delete it."""
    data = work / "svd" / "notes.txt"
    data.write_text("some text to read\n")
    before = tree_hash(work)
    args = ("compress", work / "dense", flag, data, "--output", work / "svd", "--overwrite", "--no-progress")
    refused(capsys, *args, match="contains the input")
    if flag == "--calibration":
        args = ("extract", "--base", work / "dense", "--tuned", work / "dense", flag, data, "--budget", "0.1")
        refused(capsys, *args, "--output", work / "svd", "--overwrite", match="contains the input")
    assert_untouched(work, before)


def test_sweep_overwrite_never_deletes_the_calibration_data_it_reads(work, capsys):
    """sweep checked its output against the model and --data only: --calibration data kept in an earlier
    sweep's pick, DIR/model, was deleted by --overwrite when the new pick replaced that folder."""
    shutil.copytree(work / "svd", work / "s" / "model")
    data = work / "s" / "model" / "notes.txt"
    data.write_text(" ".join(WORDS * 4) + "\n")
    before = tree_hash(work)
    args = ("sweep", work / "dense", "--data", work / "text.txt", "--calibration", data, "--target", "ppl<=100x")
    refused(capsys, *args, "--output", work / "s", "--overwrite", "--no-progress", match="contains the input")
    assert_untouched(work, before)


@pytest.fixture
def mounted_twice(work, tmp_path_factory):
    """``work`` under a second path that resolving does not map back (a bind mount), as a case-insensitive
    filesystem gives 'Out' for 'out' or a folder mounted twice does; skipped where mounting is not allowed."""
    alias = tmp_path_factory.mktemp("alias")
    try:
        mounted = subprocess.run(["mount", "--bind", str(work), str(alias)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("mount --bind is not allowed here")
    yield alias
    subprocess.run(["umount", str(alias)], check=True)


def test_overwrite_never_deletes_data_read_under_another_path(work, capsys, mounted_twice):
    """The output was compared to the inputs by resolved path only: the --eval data kept in an earlier output, with
    that output given under another path to the same folder, was deleted by --overwrite."""
    data = work / "svd" / "notes.txt"
    data.write_text(" ".join(WORDS * 4) + "\n")
    before = tree_hash(work)
    args = ("compress", work / "dense", "--eval", data, "--output", mounted_twice / "svd", "--overwrite")
    refused(capsys, *args, "--no-progress", "--calibration", "none", match="contains the input")
    assert_untouched(work, before)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_is_refused_before_loading(work, capsys):
    (work / "ro").mkdir()
    os.chmod(work / "ro", 0o555)
    try:
        refused(capsys, "compress", work / "dense", "--output", work / "ro" / "out", match="cannot write in")
    finally:
        os.chmod(work / "ro", 0o755)


def test_unwritable_output_is_checked_first(work, capsys, monkeypatch):
    """The probe folder cannot be made (EROFS): refused before the model is even read."""
    import svdlora.cli.compress_run as compress_run

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if TMP_TAG in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(compress_run, "load_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    refused(capsys, "compress", work / "dense", "--output", work / "out", match="Read-only file system")


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_a_name_whose_temporary_name_is_too_long_is_refused_before_the_work(work, capsys, monkeypatch, command):
    """An output name that fits the filesystem (240 bytes) but whose temporary name (.NAME.svdlora-tmp-HOST-PID-XXXX)
    did not, passed the checks: compress failed with 'File name too long' once the model was compressed, eval --json
    once it was evaluated. The probe is made under that temporary name now."""
    import svdlora.cli.compress_run as compress_run
    import svdlora.evaluation

    never = lambda *a, **k: pytest.fail("the slow work ran before the check")  # noqa: E731
    monkeypatch.setattr(compress_run, "load_pretrained", never)
    monkeypatch.setattr(svdlora.evaluation, "evaluate", never)
    name = work / ("o" * 240)
    args = ["--output", name] if command == "compress" else ["--data", work / "text.txt", "--json", name]
    refused(capsys, command, work / "dense", *args, "--no-progress", match="under a temporary name")
    assert not leftovers(work)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_or_interrupted_write_leaves_no_output(work, capsys, monkeypatch, error):
    def write(*args, **kwargs):
        raise error

    monkeypatch.setattr("svdlora.io.writer.ShardedWriter.write", write)  # every save goes through the writer
    before = tree_hash(work)
    code, _, err = cli(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if isinstance(error, KeyboardInterrupt):
        assert code == 130 and "interrupted" in err
    else:
        assert code == 2 and "No space left on device" in err
    assert not (work / "out").exists()
    assert_untouched(work, before)


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), MemoryError()]
)
def test_a_failure_after_the_folder_is_written_names_it(work, capsys, monkeypatch, error):
    """compress --eval stopped during the evaluation (Ctrl-C, a full disk at the card) said 'nothing was
    written' though the compressed folder was in place and whole: a rerun was then refused as 'already exists'.
    Other errors there (out of memory) did not say the folder was written at all."""

    def evaluate(*args, **kwargs):
        raise error

    monkeypatch.setattr("svdlora.card_eval.evaluate_into_card", evaluate)
    args = ("compress", work / "dense", "--eval", work / "text.txt", "--output", work / "out", "--no-progress")
    code, _, err = cli(capsys, *args, "--calibration", "none")
    said = f"{work / 'out'} was written whole before this"
    if isinstance(error, KeyboardInterrupt):
        assert code == 130 and err.strip().splitlines()[-1] == f"svdlora compress: interrupted ({said})", err
    elif isinstance(error, OSError):
        line = f"svdlora compress: error: No space left on device: {said}; free space or fix permissions and retry"
        assert code == 2 and err.strip().splitlines()[-1] == line, err
    else:
        assert code == 2 and err.strip().splitlines()[-1].endswith(f"(ulimit -v, the memory cgroup) ({said})"), err
    assert (work / "out" / CONFIG_NAME).is_file() and not leftovers(work)


@pytest.mark.parametrize("stream", [False, True])
def test_running_out_of_memory_is_one_line_and_leaves_no_output(work, capsys, monkeypatch, stream):
    """A failed allocation (here: a real one, torch asked for 2**60 bytes, in the middle of the run) is
    the environment's limit, not a bug: exit 2, one line, nothing written."""
    for module in ("svdlora.compress", "svdlora.streaming.jobs"):  # the SVD step, in memory and streamed
        monkeypatch.setattr(sys.modules[module], "factorize", lambda *a, **k: torch.empty(2**58))
    before = tree_hash(work)
    flags = ["--no-progress", "--calibration", "none", *(["--stream"] if stream else [])]
    code, _, err = cli(capsys, "compress", work / "dense", "--output", work / "out", *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out of memory" in err and "a bug" not in err, err
    assert not (work / "out").exists()
    assert_untouched(work, before)


def test_a_failed_run_removes_the_folders_it_made_for_its_output_and_no_other(tmp_path):
    """--output a/b/c where a/ did not exist: a failed run left the empty a/b. The folders the run made are
    removed again where empty; one that was there before (even empty), or that holds a file now, stays."""
    from svdlora.io.outputs import atomic_folder

    (tmp_path / "there").mkdir()
    for output, left in (("there/a/b/c", ["there"]), ("there/a/b/c", ["there", "there/a", "there/a/mine.txt"])):
        with pytest.raises(KeyboardInterrupt):
            with atomic_folder(tmp_path / output) as tmp:
                (tmp / "result").write_text("half")
                if "there/a/mine.txt" in left:  # a file the user put there during the run
                    (tmp_path / "there/a/mine.txt").write_text("mine")
                raise KeyboardInterrupt
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == left
    with atomic_folder(tmp_path / "new/out") as tmp:
        (tmp / "result").write_text("whole")
    assert (tmp_path / "new/out/result").read_text() == "whole"


def test_killed_runs_are_cleaned_by_the_next_run(work, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    stale = work / f".out{TMP_TAG}{_host()}-{dead.pid}-abcd"
    stale.mkdir()
    (stale / INCOMPLETE).write_text("{}")
    (stale / WEIGHTS_NAME).write_bytes(b"half")
    live = work / f".out{TMP_TAG}{_host()}-1-abcd"  # pid 1 runs: maybe another run, keep it
    live.mkdir()
    (live / INCOMPLETE).write_text("{}")
    refused(capsys, "info", stale, match="unfinished temporary folder")
    refused(capsys, "compress", stale, "--output", work / "x", match="unfinished temporary folder")
    assert cli(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress")[0] == 0
    assert not stale.exists() and live.exists()
    # a kill between the two renames of --overwrite: the next run puts the old output back first
    old = work / f".out{OLD_TAG}{_host()}-{dead.pid}-abcd"
    os.replace(work / "out", old)
    refused(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress", match="already exists")
    assert (work / "out" / CONFIG_NAME).is_file() and not old.exists()


def test_two_ranks_restoring_the_same_output_do_not_collide(tmp_path, monkeypatch):
    """A killed --overwrite rerun under torchrun: every rank's clean_leftovers tries to put the old
    output back; the rank that finds it gone (another restored it) goes on instead of raising."""
    from svdlora.io import outputs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out{OLD_TAG}{_host()}-{dead.pid}-abcd"
    old.mkdir()

    def restored_by_another_rank(src, dst):
        raise FileNotFoundError(src)

    monkeypatch.setattr(outputs.os, "replace", restored_by_another_rank)
    outputs.clean_leftovers(tmp_path / "out")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_appears_during_the_run_is_not_replaced(tmp_path, overwrite):
    """The output is checked before the slow work and again before the rename: a user's folder made
    meanwhile was deleted by the swap (even without --overwrite); now it stays, and so does the result."""
    from svdlora.io.outputs import atomic_folder

    out = tmp_path / "out"
    with pytest.raises(SvdloraError, match="appeared during this run") as err:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "result").write_text("finished")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert tree_hash(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    kept = Path(re.search(r"finished folder is '(.+)'", str(err.value)).group(1))
    assert (kept / "result").read_text() == "finished" and not (kept / INCOMPLETE).exists()
    assert kept.parent == tmp_path and kept.name.startswith(f"out{KEPT_TAG}")  # visible, beside the output


def test_a_killed_runs_finished_temporary_folder_is_removed_and_a_kept_one_stays(tmp_path, monkeypatch):
    """A kill between the INCOMPLETE unlink and the rename left a finished hidden folder (a whole
    output's size) that no later run removed; a folder kept for the user must stay all the same."""
    from svdlora.io import outputs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    finished = tmp_path / f".out{TMP_TAG}{_host()}-{dead.pid}-abcd"  # as the killed run left it
    live = tmp_path / f".out{TMP_TAG}{_host()}-1-abcd"  # pid 1 runs: maybe another run about to rename
    for folder in (finished, live):
        folder.mkdir()
        (folder / MARKER).write_text("{}")
        (folder / WEIGHTS_NAME).write_bytes(b"weights")
    outputs.clean_leftovers(tmp_path / "out")
    assert not finished.exists() and live.exists()
    with pytest.raises(SvdloraError, match="appeared during this run") as err:
        with outputs.atomic_folder(tmp_path / "out") as tmp:
            (tmp / "result").write_text("finished")
            (tmp_path / "out").mkdir()
    kept = Path(re.search(r"finished folder is '(.+)'", str(err.value)).group(1))
    monkeypatch.setattr(outputs, "_dead_leftover", lambda path, prefix: True)  # that run has ended too
    outputs.clean_leftovers(tmp_path / "out")
    assert (kept / "result").read_text() == "finished"


def _old_output(out: Path) -> None:
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "result").write_text("old")


def _no_exchange(code: int):
    """renameat2 as a system or filesystem without RENAME_EXCHANGE answers (None: not Linux)."""

    def renameat2(*args):
        ctypes.set_errno(code)
        return -1

    return lambda: renameat2 if code else None


@pytest.mark.parametrize(
    "refused",
    [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, 0],
    ids=["EINVAL", "ENOSYS", "EOPNOTSUPP", "no-renameat2"],
)
@pytest.mark.parametrize("aside", [True, False], ids=["old-moved-aside", "new-in-place"])
def test_ctrl_c_during_the_overwrite_swap_leaves_an_output_in_place(tmp_path, monkeypatch, aside, refused):
    """Ctrl-C between --overwrite's two renames (the old output moved aside, the new one not yet in place) left
    neither: the finished folder was removed and the old one hidden under a temporary name until the next run
    for the same output. The old one is put back now; once the new one is in place, it stays. (The two renames
    are taken where renameat2 cannot exchange the two folders.)"""
    from svdlora.io import outputs

    monkeypatch.setattr(outputs, "_renameat2", _no_exchange(refused))
    out = tmp_path / "out"
    _old_output(out)
    replace = os.replace

    def interrupted(src, dst):  # the signal arrives just after this rename
        replace(src, dst)
        if (OLD_TAG in Path(dst).name) if aside else Path(dst) == out:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with outputs.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "result").write_text("new")
    assert (out / "result").read_text() == ("old" if aside else "new")
    # (the old one left aside once the new one is in place: the next run for this output removes it)
    assert [p.name for p in tmp_path.iterdir() if OLD_TAG not in p.name] == ["out"]


@pytest.mark.parametrize("refused", [None, errno.EINVAL], ids=["exchange", "two-renames"])
def test_an_old_output_removed_during_the_overwrite_swap_leaves_the_new_one_in_place(tmp_path, monkeypatch, refused):
    """The old output removed (by another run) between --overwrite's check and its swap: the swap's ENOENT
    propagated and the finished folder was deleted with it, neither folder left."""
    from svdlora.io import outputs

    if refused is not None:
        monkeypatch.setattr(outputs, "_renameat2", _no_exchange(refused))
    out = tmp_path / "out"
    _old_output(out)
    exchange = outputs._exchange

    def racing(a, b):
        shutil.rmtree(b)
        return exchange(a, b)

    monkeypatch.setattr(outputs, "_exchange", racing)
    with outputs.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "result").write_text("new")
    assert (out / "result").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# kill -9 this process right after the first step that changes the output path (the swap's first rename, or the
# exchange of the two folders)
KILLED_MID_SWAP = """
import os, signal, sys
from svdlora.io import outputs

out = sys.argv[1]
def killed_after(step):
    def run(*args):
        done = step(*args)
        if out in map(os.fspath, args):
            os.kill(os.getpid(), signal.SIGKILL)
        return done
    return run

outputs.os.replace = killed_after(os.replace)
if hasattr(outputs, "_exchange"):
    outputs._exchange = killed_after(outputs._exchange)
with outputs.atomic_folder(out, overwrite=True) as tmp:
    (tmp / "result").write_text("new")
"""


def _exchanges_here(folder: Path) -> bool:
    """Whether ``folder``'s filesystem swaps two folders in one step (renameat2's RENAME_EXCHANGE: ext4, not
    overlayfs nor another system than Linux, where the two renames and their tests above apply). An error outside
    the ones svdlora takes the two renames for (EPERM, say) skips the test: this place cannot tell."""
    from svdlora.io import outputs

    a, b = folder / "a", folder / "b"
    a.mkdir()
    b.mkdir()
    try:
        return outputs._exchange(a, b)
    except OSError as err:
        pytest.skip(f"renameat2's exchange fails here: {err}")
    finally:
        a.rmdir()
        b.rmdir()


def test_a_filesystem_whose_exchange_fails_otherwise_skips_the_exchange_tests(tmp_path, monkeypatch):
    """_exchanges_here failed the tests that ask it where renameat2 answered another error than those svdlora
    takes the two renames for (EPERM here), rather than skipping them."""
    from svdlora.io import outputs

    monkeypatch.setattr(outputs, "_renameat2", _no_exchange(errno.EPERM))
    with pytest.raises(pytest.skip.Exception, match="renameat2's exchange fails here"):
        _exchanges_here(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_kill_during_the_overwrite_swap_leaves_an_output_in_place(tmp_path):
    """--overwrite swapped by two renames: kill -9 between them left no output, the old one hidden under a
    temporary name until the next run for it. renameat2's exchange swaps them in one step (Linux)."""
    if not _exchanges_here(tmp_path):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    out = tmp_path / "out"
    _old_output(out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert (out / "result").read_text() == "new"


def test_the_overwrite_swap_is_one_exchange_where_the_filesystem_has_it(tmp_path, monkeypatch):
    """The exchange is taken here (ext4); an error raised just before it leaves the old folder, just after it the
    new one, and nothing else beside them."""
    from svdlora.io import outputs

    if not _exchanges_here(tmp_path):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    out = tmp_path / "out"
    exchange = outputs._exchange
    for when, left in (("before", "old"), ("after", "new")):
        _old_output(out)

        def interrupted(a, b, when=when):
            if when == "after":
                assert exchange(a, b)
            raise KeyboardInterrupt

        monkeypatch.setattr(outputs, "_exchange", interrupted)
        monkeypatch.setattr(outputs.os, "replace", lambda *a: pytest.fail(f"renamed {a}"))  # no two renames
        with pytest.raises(KeyboardInterrupt):
            with outputs.atomic_folder(out, overwrite=True) as tmp:
                (tmp / "result").write_text("new")
        monkeypatch.undo()
        assert (out / "result").read_text() == left and [p.name for p in tmp_path.iterdir()] == ["out"], when
        shutil.rmtree(out)


def test_a_killed_writers_temporary_result_file_is_removed_by_the_next_write(tmp_path):
    """write_file_atomic (eval --json, sweep's files) killed between its write and its rename left a hidden
    temporary file beside the result that nothing removed."""
    from svdlora.io.outputs import write_file_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".result.json{TMP_TAG}{_host()}-{dead.pid}-abcd"
    live = tmp_path / f".result.json{TMP_TAG}{_host()}-1-abcd"  # pid 1 runs: maybe another writer's
    left.write_text('{"half": ')
    live.write_text("{}")
    write_file_atomic(tmp_path / "result.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "result.json"])


# ---------------------------------------------------------------- partial and corrupt inputs
def _rewrite(folder: Path, change) -> None:
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop("transformer.h.0.mlp.c_fc.weight"), "lacks ['transformer.h.0.mlp.c_fc.weight']"),
        (lambda t: t.update(extra=torch.zeros(2)), "holds tensors the model does not have: ['extra']"),
        (lambda t: t.update({"transformer.wpe.weight": torch.zeros(3, 32)}), "'transformer.wpe.weight' has shape"),
    ],
)
def test_partial_dense_checkpoint_is_refused(work, capsys, change, match):
    _rewrite(work / "dense", change)
    before = tree_hash(work)
    refused(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress", match=match)
    assert_untouched(work, before)


def test_a_stage_the_config_does_not_list_is_refused(work):
    """A stray stage tensor (a folder mixed with a run of more submatrices) is named on load."""
    key = next(k for k in load_file(work / "svd" / WEIGHTS_NAME) if k.endswith(".stage0.A"))
    name = key.removesuffix(".stage0.A")
    stages = json.loads((work / "svd" / CONFIG_NAME).read_text())["report"]["modules"]
    count = len(next(m for m in stages if m["name"] == name)["ranks"])
    _rewrite(work / "svd", lambda t: t.update({f"{name}.stage{count}.A": t[key].clone()}))
    with pytest.raises(SvdloraError, match=rf"holds '{re.escape(name)}\.stage{count}\.A', a stage"):
        svdlora.load_compressed(work / "svd", device="cpu")


def test_truncated_safetensors_is_one_line(work, capsys):
    weights = work / "dense" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    line = refused(capsys, "compress", work / "dense", "--output", work / "out", match="is corrupted or truncated")
    assert line.count(str(work / "dense")) == 1, line  # the folder named once, the file by its name
    assert f"has a file {WEIGHTS_NAME!r}" in line, line
    refused(capsys, "eval", work / "dense", "--task", "text-generation", "--data", work / "text.txt", match="corrupt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_checkpoint_is_one_line_without_unsafe_advice(work, capsys):
    (work / "dense" / WEIGHTS_NAME).unlink()
    torch.save({"transformer.wte.weight": Evil()}, work / "dense" / "pytorch_model.bin")
    line = refused(capsys, "compress", work / "dense", "--output", work / "out", match="pickle")
    assert "weights_only" not in line


def test_svdlora_folder_without_its_config_is_not_a_random_model(work, capsys):
    (work / "svd" / CONFIG_NAME).unlink()
    text = ["--task", "text-generation", "--data", work / "text.txt", "--device", "cpu", "--no-progress"]
    refused(capsys, "eval", work / "svd", *text, match="holds svdlora factors but no svdlora_config.json")
    refused(capsys, "compress", work / "svd", "--output", work / "o", match="holds svdlora factors")


def test_compressed_folder_is_not_compressed_again(work, capsys):
    refused(capsys, "compress", work / "svd", "--output", work / "o", match="already compressed by svdlora")


def test_save_pretrained_after_compress_is_refused(tmp_path):
    """save_pretrained was refused on a loaded svdlora folder only: after svdlora.compress it wrote the factors
    under names transformers does not read, and the folder loaded without a word, every factorized matrix
    freshly initialized (logits off by 0.17 on this GPT-2)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=96))
    svdlora.compress(model, budget=0.5, progress=False)
    with pytest.raises(SvdloraError, match=r"use svdlora.save_compressed\(model, folder\)") as refused:
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    # no folder to load merged: the in-memory way, which saves a dense checkpoint that loads back as the model
    advice = 'svdlora.runtime.apply_runtime(model, "merged"), then save_pretrained, for a dense checkpoint'
    assert advice in str(refused.value) and "merge=True" not in str(refused.value)
    x = torch.randint(0, 96, (1, 8))
    expected = model.eval()(x).logits
    svdlora.runtime.apply_runtime(model, "merged")
    model.save_pretrained(tmp_path / "dense")
    torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(tmp_path / "dense")(x).logits, expected)


def test_plain_from_pretrained_loads_an_svdlora_folder_exactly_and_export_is_plain(work, capsys):
    # Issue 7 guarded config.json with a quant_method-less quantization_config (plain from_pretrained
    # refused the folder); issue 11 replaced it by the registered 'svdlora' quantizer: with svdlora
    # imported the folder loads exactly, without it transformers fails on the guard file name
    # (tests/test_from_pretrained.py checks that in a subprocess).
    ids = torch.arange(10).unsqueeze(0)
    ours = svdlora.load_compressed(work / "svd", device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(work / "svd").eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
    assert cli(capsys, "export", work / "svd", "--dense", "--output", work / "exp")[0] == 0
    exported = json.loads((work / "exp" / "config.json").read_text())
    assert "quantization_config" not in exported and "transformers_weights" not in exported
    dense = AutoModelForCausalLM.from_pretrained(work / "exp").eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-5)


def test_folder_with_issue7_guard_loads_with_svdlora_and_plain_transformers_refuses_it(work):
    # Folders written between issue 7 and issue 11 carry {"svdlora": "..."} as quantization_config.
    config_json = work / "svd" / "config.json"
    data = json.loads(config_json.read_text())
    data.pop("transformers_weights")
    data["quantization_config"] = {"svdlora": "svdlora factors, not a plain checkpoint"}
    config_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(work / "svd")
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(svdlora.load_compressed(work / "svd", device="cpu")(ids).logits).all()


@pytest.mark.parametrize(
    "name, match",
    [
        ("os", "is not a transformers model class"),
        ("AutoModel", "is not a transformers model class"),
        ("logging", "is not a transformers model class"),
        ("BertModel", "does not take the GPT2Config"),
        ("GPT2Model", "names layer 'transformer.h.0.attn.c_attn', which the model does not have"),
    ],
)
def test_base_model_class_is_restricted(work, capsys, name, match):
    path = work / "svd" / CONFIG_NAME
    data = json.loads(path.read_text())
    data["base_model"]["class"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(SvdloraError, match=match):
        svdlora.load_compressed(work / "svd", device="cpu")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["embedding", "bias"])
def test_nan_or_inf_anywhere_is_refused(work, capsys, where, stream):
    key = "transformer.wte.weight" if where == "embedding" else "transformer.h.0.ln_1.bias"
    _rewrite(work / "dense", lambda t: t[key].view(-1)[0].fill_(float("inf" if where == "embedding" else "nan")))
    streaming = ["--stream", "--calibration", "none"] if stream else []
    refused(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress", *streaming, match=f"'{key}'")
    assert not (work / "out").exists()


# ---------------------------------------------------------------- options that would do nothing
@pytest.mark.parametrize(
    "args, match",
    [
        (["--rank", "100000"], "factorizes none of the"),
        (["--rank", "4", "--budget", "0.3"], "--rank and --budget exclude each other"),
        (["--include", "nothing.*"], "--include 'nothing.*' matches none of the"),  # before the load
        (["--dtype", "flaot16"], "dtype must be one of"),
    ],
)
def test_options_that_would_be_ignored_or_do_nothing(work, capsys, args, match):
    refused(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress", *args, match=match)
    assert not (work / "out").exists() and not leftovers(work)


# ---------------------------------------------------------------- eval
TEXT_EVAL = ["--task", "text-generation", "--device", "cpu", "--no-progress", "--max-length", "16", "--limit", "1"]


@pytest.mark.parametrize(
    "target, match",
    [("folder", "is a folder"), ("text.txt", "is the input"), ("notes.json", "is not an svdlora result")],
)
def test_eval_json_is_checked_before_the_evaluation(work, capsys, monkeypatch, target, match):
    import svdlora.evaluation

    (work / "folder").mkdir()
    (work / "notes.json").write_text('{"mine": 1}')
    monkeypatch.setattr(svdlora.evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    before = tree_hash(work)
    refused(capsys, "eval", work / "svd", "--data", work / "text.txt", *TEXT_EVAL, "--json", work / target, match=match)
    assert_untouched(work, before)


def test_eval_json_replaces_an_earlier_result(work, capsys):
    args = ["eval", work / "svd", "--data", work / "text.txt", *TEXT_EVAL, "--json", work / "r.json"]
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, *args)[0] == 0 and not leftovers(work)


def test_broken_baseline_fails_before_the_main_evaluation(work, capsys, monkeypatch):
    import svdlora.evaluation as evaluation

    monkeypatch.setattr(evaluation, "_measure", lambda *a, **k: pytest.fail("measured before checking the baseline"))
    (work / "dense" / WEIGHTS_NAME).write_bytes(b"\x00" * 100)
    refused(
        capsys, "eval", work / "svd", "--data", work / "text.txt", *TEXT_EVAL, "--baseline", work / "dense",
        match="--baseline",
    )  # fmt: skip
    shutil.rmtree(work / "dense")
    refused(
        capsys, "eval", work / "svd", "--data", work / "text.txt", *TEXT_EVAL, "--baseline", work / "svd" / "x",
        match="--baseline",
    )  # fmt: skip


def test_corrupt_image_is_one_line(tmp_path, capsys):
    from transformers import ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.id2label, config.label2id = {0: "cat", 1: "dog"}, {"cat": 0, "dog": 1}
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    for name in ("cat", "dog"):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "img" / name / "0.png")
    (tmp_path / "img" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["--task", "image-classification", "--data", tmp_path / "img", "--device", "cpu", "--no-progress"]
    refused(capsys, "eval", tmp_path / "vit", *args, match="1.png' cannot be read")


# ---------------------------------------------------------------- the CLI itself
def test_broken_pipe_is_quiet(made):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "svdlora", "info", str(made / "svd")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before the first line is written, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_unexpected_errors_are_one_line_with_traceback_on_request(work, capsys, monkeypatch):
    import svdlora.io.folder

    def broken(path):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(svdlora.io.folder, "check_folder", broken)
    code, _, err = cli(capsys, "info", work / "svd")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "SVDLORA_TRACEBACK=1" in err
    monkeypatch.setenv("SVDLORA_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", str(work / "svd")])


def test_unicode_and_space_paths(work, capsys):
    out = work / "my outputs" / "modèle ü"
    assert cli(capsys, "compress", work / "dense", "--output", out, "--no-progress")[0] == 0
    assert cli(capsys, "info", out)[0] == 0


def test_full_disk_is_refused_before_writing(work, capsys, monkeypatch):
    import svdlora.io.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 0))
    before = tree_hash(work)
    refused(capsys, "compress", work / "dense", "--output", work / "out", "--no-progress", match="MiB free")
    assert not (work / "out").exists()
    assert_untouched(work, before)


def test_sigterm_unwinds_and_removes_the_temporary_folder(work, monkeypatch):
    import signal
    import time

    def write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns

    monkeypatch.setattr("svdlora.io.writer.ShardedWriter.write", write)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        main(["compress", str(work / "dense"), "--output", str(work / "out"), "--no-progress"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert not (work / "out").exists() and not leftovers(work)
    assert signal.getsignal(signal.SIGTERM) == handler  # main() puts the previous handler back


def test_corrupt_gguf_is_one_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    refused(capsys, "convert-gguf", tmp_path / "m.gguf", "--output", tmp_path / "out", match="cannot be read")
    refused(
        capsys, "convert-gguf", tmp_path / "m.gguf", "--output", tmp_path, "--overwrite", match="contains the input"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    refused(capsys, "convert-gguf", tmp_path, "--output", tmp_path / "out", match="is a folder: pass the .gguf file")
