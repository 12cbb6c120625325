"""Real faults under a running conversion: a volume whose write-back fails, disk full in each lane, a file system
turned read-only, SIGKILL at random points. In each case either the output is byte-identical to an uninterrupted
run, or the run exits non-zero with one line naming the file, and never prints `wrote`.

The volumes are made as root (a loop device on a small tmpfs, with ext4 on it; tmpfs mounts); where the machine
refuses (not root, no loop device), the test is skipped with the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from converter import write
from converter.write import ShardWriter
from converter.output_dir import OutputDir

from .conftest import run_cli, tree_digest

ARGS = ("--max-shard-size", "20MB", "--no-arch-check")


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs and a loop device)")


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        _sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(exc, 'stderr', exc)}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """`make(size)`: a tmpfs of that size, unmounted after the test."""
    _need_root()
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        _umount(path)


@pytest.fixture
def thin_volume(tmp_path):
    """An ext4 file system of 256 MiB on a loop device whose backing file lies on a tmpfs of `backing` bytes: it
    accepts every write, and write-back fails once the tmpfs is full (a thin-provisioned or network volume whose
    backing store fills)."""
    _need_root()
    if not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs losetup and mkfs.ext4")
    made = {}

    def make(backing: str) -> Path:
        store, mnt = tmp_path / "store", tmp_path / "volume"
        _mount_tmpfs(store, backing)
        made["store"] = store
        image = store / "image"
        with open(image, "wb") as f:
            f.truncate(256 * 2**20)
        try:
            loop = _sh("losetup", "-f", "--show", str(image))
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"no loop device: {getattr(exc, 'stderr', exc)}")
        made["loop"] = loop
        mnt.mkdir()
        try:
            _sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", loop)
            _sh("mount", loop, str(mnt))
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot make an ext4 file system on a loop device here: {getattr(exc, 'stderr', exc)}")
        made["mnt"] = mnt
        return mnt

    yield make
    if "mnt" in made:
        _umount(made["mnt"])
    if "loop" in made:
        subprocess.run(["losetup", "-d", made["loop"]], capture_output=True)
    if "store" in made:
        _umount(made["store"])


def _one_line_error(result, *fragments: str) -> str:
    """The run failed with exactly one line on stderr naming what failed, and never said `wrote`."""
    assert result.exit_code != 0, result.output
    assert "wrote" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert-fp8: error: "), result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_write_back_that_fails_under_the_run_stops_it_naming_the_file(toy_src, thin_volume, monkeypatch):
    """The page cache takes every write; the loop device's backing tmpfs fills while a range is written back. The
    write-back error is reported once, to the wait on that range: it must stop the run, not vanish."""
    monkeypatch.setattr(write, "WRITE_BEHIND_BYTES", 4 * 2**20)  # the wait path every shard over 256 MiB takes
    volume = thin_volume("16M")
    dst = volume / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    line = _one_line_error(result, str(dst / ".convert-fp8.partial"), ".safetensors")
    assert any(what in line for what in ("disk full while", "input/output error while", "read-only file system "
                                         "while")), line
    assert not (dst / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backing", ["12M", "20M", "28M", "36M", "96M"])
def test_a_thin_volume_of_any_size_gives_the_same_bytes_or_one_line(toy_src, toy_reference, thin_volume,
                                                                   monkeypatch, backing):
    """Wherever the backing store runs out (or not at all), the run ends with the bytes of an uninterrupted run,
    or with one line and no `wrote`; a rerun after freeing space gives the same bytes."""
    monkeypatch.setattr(write, "WRITE_BEHIND_BYTES", 4 * 2**20)
    dst = thin_volume(backing) / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    if result.exit_code == 0:
        assert "wrote" in result.stdout and tree_digest(dst) == tree_digest(toy_reference)
        verify = run_cli("verify", "--src", toy_src, "--dst", dst, "--no-arch-check")
        assert verify.exit_code == 0, verify.output
    else:
        _one_line_error(result, str(dst))


def test_pieces_are_recorded_only_once_their_write_back_returned_without_error(toy_src, tmp_path, monkeypatch):
    """A failed wait on a range records nothing of it, nor of the ranges queued behind it."""
    mib = 2**20
    from converter.manifest import Manifest
    from converter.plan import COPY, ShardPlan, TensorPlan

    monkeypatch.setattr(write, "WRITE_BEHIND_BYTES", 2 * mib)
    real = write._sync_file_range
    fail_at = {"offset": None}

    def sync(fd, offset, length, flags):
        if flags == write._SYNC_WAIT and offset == fail_at["offset"]:
            import ctypes

            ctypes.set_errno(5)
            return -1
        return real(fd, offset, length, flags)

    monkeypatch.setattr(write, "_sync_file_range", sync)
    plan = ShardPlan("s.safetensors", (TensorPlan("w", "w", COPY, "U8", (8 * mib,), "r"),))
    manifest = Manifest(tmp_path / "manifest.jsonl")
    writer = ShardWriter(tmp_path / "s.safetensors", plan, manifest)
    writer.open()
    base = len(write.shard_header(plan))
    fail_at["offset"] = base + 1 * mib
    writer.write_at("w", 0, b"\1" * mib)
    writer.write_at("w", mib, b"\2" * mib)
    with pytest.raises(write.WriteError, match=r"s\.safetensors: input/output error while writing w"):
        for k in range(2, 8):
            writer.write_at("w", k * mib, bytes([k]) * mib)
    writer.abort()
    manifest.close()
    assert [(p.tensor, p.start) for p in manifest.load().values()] == [("w", 0)]


@pytest.mark.parametrize("lane, tensor", [
    ("copy", "model.embed_tokens.weight"),
    ("quantize", "model.layers.0.mlp.up_proj.weight"),
])
def test_disk_full_in_a_lane(toy_src, tmpfs, monkeypatch, lane, tensor):
    """The free-space check passed, then something else filled the disk: the lane's next write fails. (The other
    lane's writes wait meanwhile, and a while after it, so that the first failure is this lane's.)"""
    volume = tmpfs("64M")
    lock, failed = threading.Lock(), threading.Event()
    quantized = lambda name: name.endswith(("proj.weight", "_scale_inv"))  # noqa: E731

    for method in ("write_at", "copy_at"):  # the copy lane writes whole pages with write_at, the rest with copy_at
        real = getattr(ShardWriter, method)

        def guarded(writer, name, *args, _real=real, **kwargs):
            if name == tensor:
                with lock:
                    _fill(volume)
                    try:
                        return _real(writer, name, *args, **kwargs)
                    finally:
                        failed.set()
            if quantized(name) != (lane == "quantize"):  # the other lane's
                with lock:
                    if failed.is_set():
                        time.sleep(1)
            return _real(writer, name, *args, **kwargs)

        monkeypatch.setattr(ShardWriter, method, guarded)
    dst = volume / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    verb = "copying" if lane == "copy" else "writing"
    _one_line_error(result, f"disk full while {verb} {tensor}", str(dst / ".convert-fp8.partial"))
    assert not dst.exists()


def test_disk_full_while_copying_the_side_files(toy_src, tmpfs, monkeypatch):
    volume = tmpfs("64M")
    real = OutputDir.copy_file

    def fill_then_copy(out, src, relative):
        _fill(volume)
        return real(out, src, relative)

    monkeypatch.setattr(OutputDir, "copy_file", fill_then_copy)
    dst = volume / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    _one_line_error(result, "disk full while copying tokenizer.json", "tokenizer.json")
    assert not dst.exists()


def test_a_file_system_turned_read_only_before_the_final_renames(toy_src, thin_volume, monkeypatch):
    """A thin volume that fills turns read-only (ext4 errors=remount-ro does the same): the run names the folder
    and what it was doing."""
    volume = thin_volume("128M")
    real = OutputDir.commit

    def read_only_then_commit(out, names):
        _sh("mount", "-o", "remount,ro", str(volume))
        return real(out, names)

    monkeypatch.setattr(OutputDir, "commit", read_only_then_commit)
    dst = volume / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    _one_line_error(result, str(dst), "read-only file system while")


def _fill(volume: Path) -> None:
    """Take every free byte of the file system at `volume`."""
    with open(volume / "filler", "ab") as f:
        block = b"\0" * 2**20
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    assert shutil.disk_usage(volume).free < 2**20


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_a_random_point_then_the_same_command(toy_src, toy_reference, tmp_path, seed):
    """Killed anywhere (writing, closing a shard, finalizing), the same command ends with the same bytes."""
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "converter.cli", "--src", str(toy_src), "--dst", str(dst), *ARGS]
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    full = time.monotonic() - started
    shutil.rmtree(dst)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(random.Random(seed).uniform(0.1, 1.0) * full)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    if proc.returncode == 0:  # it finished first
        assert b"wrote" in out
    # The output is in place once its staging folder is gone: killed after that (while printing the summary or
    # while Python shut down), the run had finished: the same command finds it finished and writes nothing.
    finished = dst.is_dir() and not (dst / ".convert-fp8.partial").exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if finished:
        assert rerun.returncode == 0, (proc.returncode, rerun.stderr)
        assert "already holds this command's finished output: nothing written" in rerun.stdout, rerun.stdout
    else:
        assert b"wrote" not in out
        assert rerun.returncode == 0, rerun.stderr
    assert tree_digest(dst) == tree_digest(toy_reference)


# Root reads a mode-000 file through two capabilities; a run without them meets the permissions a user meets, while
# it still owns the checkout, its interpreter and the test's files, wherever they lie (a clone in a mode-700 folder).
_WITHOUT_READ_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                          "--bounding-set=-dac_override,-dac_read_search", "--"]


def _run_without_read_override(*args: str) -> subprocess.CompletedProcess:
    """`convert-fp8 ARGS` in a process that cannot read what its owner may not (root reads a mode-000 file)."""
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "converter.cli", *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's right to read any file")
        probe = subprocess.run([*_WITHOUT_READ_OVERRIDE, "true"], capture_output=True, text=True)
        if probe.returncode:
            pytest.skip(f"this machine refuses to drop capabilities: {probe.stderr.strip()}")
        cmd = [*_WITHOUT_READ_OVERRIDE, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("unreadable", ["1_Pooling", "tokenizer.json"])
def test_an_unreadable_part_of_the_source_is_one_line_before_writing(toy_src, unreadable, tmp_path):
    src = Path(shutil.copytree(toy_src, tmp_path / "src"))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    os.chmod(src / unreadable, 0)
    try:
        dst = tmp_path / "out"
        dry = _run_without_read_override("--src", str(src), "--dst", str(dst), "--dry-run", "--no-arch-check")
        assert dry.returncode == 1 and "dry run" not in dry.stdout, dry.stdout
        assert dry.stderr == f"convert-fp8: error: {src / unreadable}: cannot read this " \
                             f"{'folder' if unreadable == '1_Pooling' else 'file'} of the source: permission denied\n"
        done = _run_without_read_override("--src", str(src), "--dst", str(dst), *ARGS)
        assert done.returncode == 1 and done.stderr == dry.stderr and "wrote" not in done.stdout
        assert not dst.exists()  # nothing was written
    finally:
        os.chmod(src / unreadable, 0o755)


@pytest.mark.slow
def test_the_unreadable_source_tests_pass_from_a_checkout_in_a_private_folder(tmp_path):
    """A checkout inside a mode-700 folder (as `mktemp -d` makes): the tests that drop privileges still pass."""
    root = Path(__file__).parent.parent
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    clone = private / "checkout"
    for relative in filter(None, tracked.decode().split("\0")):
        if (root / relative).is_file():
            (clone / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / relative, clone / relative)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(clone)  # this copy's package, not the editable install's
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "unreadable_part_of_the_source",
         "tests/test_faults.py"], cwd=clone, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout, result.stdout[-3000:]


def test_every_file_and_folder_of_the_output_is_flushed_before_wrote(toy_src, tmp_path, monkeypatch):
    """A power cut after `wrote` leaves the output as it was: every file's data and every folder's entries were
    flushed to disk (fsync) before it was printed."""
    src = Path(shutil.copytree(toy_src, tmp_path / "src"))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dst = tmp_path / "out"
    result = run_cli("--src", src, "--dst", dst, *ARGS)
    assert result.exit_code == 0, result.output
    staged = str(dst / ".convert-fp8.partial")
    flushed = {p.replace(staged, str(dst)) for p in synced}
    entries = [dst, *dst.rglob("*")]
    assert [str(p) for p in entries if str(p) not in flushed] == []
    assert str(tmp_path) in flushed  # the folder holding the new dst entry
    last_dirs = [p for p in synced[-3:]]
    assert str(dst) in last_dirs  # the final renames were flushed after they were made


def test_a_file_system_that_refuses_direct_reads_is_read_through_the_page_cache(toy_src, toy_reference, tmp_path,
                                                                              monkeypatch):
    """Some file systems take O_DIRECT at open and refuse the read (EINVAL): the same bytes, buffered."""
    import fcntl

    real = os.preadv
    refused = []

    def preadv(fd, buffers, offset, *flags):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    for shard in toy_src.glob("*.safetensors"):  # out of the page cache, so that the reads go to the disk
        fd = os.open(shard, os.O_RDONLY)
        os.fsync(fd)  # dirty pages stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    dst = tmp_path / "out"
    result = run_cli("--src", toy_src, "--dst", dst, *ARGS)
    assert result.exit_code == 0, result.output
    if not refused:
        pytest.skip("the file system under the tests refuses O_DIRECT at open already")
    assert tree_digest(dst) == tree_digest(toy_reference)


@pytest.mark.parametrize("args, message", [
    (("--block-size", "48"), "48: expected 64 or 128"),
    (("--quantizer", "numba", "--device", "cuda"), "--quantizer numba runs on the CPU; --device cuda applies to "
                                                   "--quantizer torch"),
])
def test_options_the_tool_would_not_honour_are_refused(toy_src, tmp_path, args, message):
    result = run_cli("--src", toy_src, "--dst", tmp_path / "out", *ARGS, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_preset_with_a_block_size_the_kernels_do_not_take_is_refused(toy_src, tmp_path):
    (tmp_path / "odd.json").write_text('{"block_size": 48, "modules_to_not_convert": []}')
    result = run_cli("--src", toy_src, "--dst", tmp_path / "out", *ARGS, "--config", tmp_path / "odd.json")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "block_size 48: expected 64 or 128" in result.stderr and not (tmp_path / "out").exists()


def test_a_dst_under_a_file_is_one_line(toy_src, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli("--src", toy_src, "--dst", tmp_path / "afile" / "x", *ARGS)
    assert result.exit_code == 2
    assert result.stderr == (f"convert-fp8: error: {tmp_path / 'afile' / 'x'}: --dst lies under "
                             f"{tmp_path / 'afile'}, which is a file, not a folder\n")


def test_a_reader_that_goes_away_stops_the_output_quietly(toy_src, tmp_path):
    """`convert-fp8 --dry-run | head -1`: the pipe closes under the writer, which stops without a word."""
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    read, write_end = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(toy_src), "--dst",
                               str(tmp_path / "out"), "--dry-run", "--no-arch-check"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 128 + signal.SIGPIPE
