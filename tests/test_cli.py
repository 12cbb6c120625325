"""Bad input: each refused with one line and a non-zero exit, no traceback, the source untouched and nothing
finished-looking left in --dst."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest


from .conftest import locate, run_cli, tree_digest

LINEAR = "model.language_model.layers.1.mlp.up_proj.weight"


def assert_refused(result, message, src, before, dst):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("convert-fp8: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    if src is not None and src.exists():
        assert tree_digest(src) == before
    if dst.exists():
        leftovers = {p.name for p in dst.iterdir()}
        assert not leftovers & {"config.json", "model.safetensors.index.json", ".convert-fp8.partial"}, leftovers
        assert not any(name.endswith(".safetensors") for name in leftovers), leftovers


def convert_refused(src, dst, message, *extra):
    before = tree_digest(src) if src.exists() else None
    result = run_cli("--src", src, "--dst", dst, *extra)
    assert_refused(result, message, src, before, dst)
    return result


def test_finalize_refuses_a_run_record_without_a_conversions_options(tmp_path):
    dst = tmp_path / "out"
    (dst / ".convert-fp8.partial").mkdir(parents=True)
    (dst / ".convert-fp8.partial" / "run.json").write_text(
        json.dumps({"identity": "0" * 16, "parts": 1, "src": str(tmp_path / "src"), "options": {"dtype": "bf16"}}))
    result = run_cli("finalize", "--dst", dst)
    assert result.exit_code == 2
    assert result.stderr == (f"convert-fp8: error: {dst}: .convert-fp8.partial/run.json does not record a "
                             "conversion's options, so finalize cannot complete it; rerun the command that began it "
                             "to resume it\n")


def test_missing_source(tmp_path):
    convert_refused(tmp_path / "nope", tmp_path / "dst", "source folder not found")


def test_truncated_shard(gemma_copy, tmp_path):
    shard, _ = locate(gemma_copy, LINEAR)
    os.truncate(shard, shard.stat().st_size - 100)
    convert_refused(gemma_copy, tmp_path / "dst", f"{shard.name}: truncated")


def test_corrupt_header(gemma_copy, tmp_path):
    shard, _ = locate(gemma_copy, LINEAR)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    convert_refused(gemma_copy, tmp_path / "dst", f"{shard.name}: corrupt header: not valid JSON")


def test_index_naming_a_missing_shard(gemma_copy, tmp_path):
    shard, _ = locate(gemma_copy, LINEAR)
    shard.unlink()
    convert_refused(gemma_copy, tmp_path / "dst", f"names shard '{shard.name}', which is not in")


def test_no_config(gemma_copy, tmp_path):
    (gemma_copy / "config.json").unlink()
    convert_refused(gemma_copy, tmp_path / "dst", "config.json: no config.json in the source folder")


def test_nan_in_a_weight_names_tensor_and_shard(gemma_copy, tmp_path):
    shard, info = locate(gemma_copy, LINEAR)
    with open(shard, "r+b") as f:
        f.seek(info.offset + 2 * (128 * 70 + 5))  # row 70, column 5
        f.write(b"\xc0\x7f")  # BF16 NaN
    dst = tmp_path / "dst"
    convert_refused(gemma_copy, dst, f"tensor {LINEAR} in shard {shard.name} holds NaN or Inf (near row 64)")
    assert not dst.exists()  # this run created it, and removed it


def test_dst_with_files_of_its_own(gemma_src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    convert_refused(gemma_src, dst, "--dst already holds 1 file(s) (notes.txt, ...); pass --overwrite")
    assert (dst / "notes.txt").read_text() == "mine"


def test_dst_inside_src(gemma_copy):
    convert_refused(gemma_copy, gemma_copy / "fp8", "is inside --src")
    before = tree_digest(gemma_copy)
    result = run_cli("--src", gemma_copy, "--dst", gemma_copy, "--overwrite")
    assert result.exit_code == 2 and "is inside --src" in result.stderr
    assert tree_digest(gemma_copy) == before
    result = run_cli("--src", gemma_copy, "--dst", gemma_copy.parent, "--overwrite")
    assert result.exit_code == 2 and "--src" in result.stderr and "is inside --dst" in result.stderr
    assert tree_digest(gemma_copy) == before


def test_disk_full_during_the_write_removes_the_partial_output(gemma_src, tmp_path, monkeypatch):
    """ENOSPC from the file system in the middle of a shard."""
    import converter.write as write

    real_write, calls = os.pwrite, []

    def filling_write(fd, data, offset):
        calls.append(len(data))
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data, offset)

    monkeypatch.setattr(write.os, "pwrite", filling_write)
    dst = tmp_path / "dst"
    convert_refused(gemma_src, dst, "disk full while writing model.language_model")
    assert len(calls) == 5 and not dst.exists()


@pytest.fixture
def tiny_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_on_a_real_small_filesystem(gemma_src, tiny_filesystem, monkeypatch):
    convert_refused(gemma_src, tiny_filesystem / "dst", "disk full: the output needs")
    import converter.output_dir as output_dir  # now skip the up-front space check: the file system itself must say no

    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    convert_refused(gemma_src, tiny_filesystem / "dst", "disk full while ")
    assert list(tiny_filesystem.iterdir()) == []


def test_permission_denied(gemma_src, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores mode bits; an immutable folder refuses even root
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
            pytest.skip("running as root without chattr +i support: cannot make a folder unwritable")
    else:
        locked.chmod(0o555)
    try:
        convert_refused(gemma_src, locked / "dst", "permission denied while creating the output folder")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


def test_unknown_preset_and_bad_size(gemma_src, tmp_path):
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "d", "--config", "nope")
    assert result.exit_code == 1 and "no preset named 'nope'; available: deepseek-v3, default, gemma-4-26b-a4b-it, gemma-4-31b-it, gemma-4-e2b-it, gemma-4-e4b-it, glm4-moe, llama, mixtral, qwen3-moe" in result.stderr
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "d", "--max-shard-size", "lots")
    assert result.exit_code == 2 and "not a size: 'lots'" in result.stderr


def test_console_script_runs_as_a_process(gemma_src, tmp_path):
    """The installed entry point, as a user types it: exit codes and a one-line error."""
    done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(tmp_path / "x"), "--dst",
                           str(tmp_path / "y")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"convert-fp8: error: {tmp_path / 'x'}: source folder not found"
