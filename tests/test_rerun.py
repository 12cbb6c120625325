"""A finished command run again (a requeued job, a script run twice) exits 0 without writing, and only when --dst
holds exactly what that command writes; odd shapes and messages that point the user the right way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import run_cli, tree_digest

ARGS = ("--max-shard-size", "20MB", "--no-arch-check")


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def finished(toy_src, toy_reference, tmp_path) -> Path:
    """A finished conversion of `toy_src` (the reference's bytes) in a folder of the test's own."""
    dst = Path(shutil.copytree(toy_reference, tmp_path / "out"))
    assert tree_digest(dst) == tree_digest(toy_reference)
    return dst


def test_a_finished_conversion_run_again_exits_0_and_writes_nothing(toy_src, finished):
    before = _mtimes(finished)
    digest = tree_digest(finished)
    result = run_cli("--src", toy_src, "--dst", finished, *ARGS)
    assert result.exit_code == 0, result.output
    assert "wrote" not in result.output
    assert result.output.startswith(f"{finished} already holds this command's finished output: nothing written "
                                    "(checked in ")
    assert "2 shard header(s) and size(s), 3 written file(s) byte for byte, 1 copied file size(s), no source " \
           "shard changed since; `convert-fp8 verify` checks every byte, --overwrite writes it again)" in result.output
    assert _mtimes(finished) == before and tree_digest(finished) == digest


@pytest.mark.parametrize("change, args", [
    ("other options", ("--max-shard-size", "10MB", "--no-arch-check")),
    ("a file of the user's", ARGS),
    ("a shard cut short", ARGS),
    ("the card edited", ARGS),
])
def test_anything_else_in_dst_is_still_refused(toy_src, finished, tmp_path, change, args):
    src = toy_src
    if change == "a file of the user's":
        (finished / "notes.txt").write_text("mine")
    elif change == "a shard cut short":
        shard = sorted(finished.glob("model-*.safetensors"))[0]
        os.truncate(shard, shard.stat().st_size - 1)
    elif change == "the card edited":
        (finished / "README.md").write_text((finished / "README.md").read_text() + "\nmine\n")
    digest = tree_digest(finished)
    result = run_cli("--src", src, "--dst", finished, *args)
    assert result.exit_code == 2, result.output
    assert "--dst already holds" in result.output and "pass --overwrite" in result.output
    assert tree_digest(finished) == digest


def test_a_source_rewritten_after_the_output_finished_is_refused(toy_src, tmp_path):
    src = Path(shutil.copytree(toy_src, tmp_path / "toy"))
    dst = tmp_path / "out"
    assert run_cli("--src", src, "--dst", dst, *ARGS).exit_code == 0
    assert run_cli("--src", src, "--dst", dst, *ARGS).exit_code == 0  # finished: nothing to do
    shard = sorted(src.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, (dst / "config.json").stat().st_mtime_ns + 10**9))
    result = run_cli("--src", src, "--dst", dst, *ARGS)  # same headers, the values maybe not
    assert result.exit_code == 2 and "--dst already holds" in result.output


def test_each_part_of_a_finished_partitioned_conversion_run_again_exits_0(toy_src, toy_reference, tmp_path):
    dst = tmp_path / "out"
    for i in (1, 2):
        assert run_cli("--src", toy_src, "--dst", dst, "--part", f"{i}/2", *ARGS).exit_code == 0
    assert tree_digest(dst) == tree_digest(toy_reference)
    for i in (1, 2):
        result = run_cli("--src", toy_src, "--dst", dst, "--part", f"{i}/2", *ARGS)
        assert result.exit_code == 0 and "already holds this command's finished output" in result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_a_finished_dequantize_run_again_exits_0(toy_reference, tmp_path):
    dst = tmp_path / "bf16"
    first = run_cli("dequantize", "--src", toy_reference, "--dst", dst)
    assert first.exit_code == 0 and f"wrote {dst}" in first.output
    before, digest = _mtimes(dst), tree_digest(dst)
    again = run_cli("dequantize", "--src", toy_reference, "--dst", dst)
    assert again.exit_code == 0, again.output
    assert "already holds this command's finished output: nothing written" in again.output
    assert "wrote" not in again.output and _mtimes(dst) == before and tree_digest(dst) == digest
    other = run_cli("dequantize", "--src", toy_reference, "--dst", dst, "--dtype", "f16")
    assert other.exit_code == 2 and "--dst already holds" in other.output


def _with_empty_linear(path: Path, shape: tuple[int, ...]) -> Path:
    path.mkdir()
    torch.manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(256, 128).bfloat16(),
               "model.layers.0.mlp.up_proj.weight": torch.randn(128, 128).bfloat16(),
               "model.layers.0.mlp.odd_proj.weight": torch.zeros(shape, dtype=torch.bfloat16)},
              path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


@pytest.mark.parametrize("shape", [(64, 0), (0, 0), (0, 64)])
def test_a_linear_weight_with_no_value_is_copied_excluded_and_verified(tmp_path, shape):
    from safetensors import safe_open

    src = _with_empty_linear(tmp_path / "src", shape)
    dst = tmp_path / "out"
    result = run_cli("--src", src, "--dst", dst, "--no-arch-check")
    assert result.exit_code == 0, result.output
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.odd_proj.weight").get_dtype() == "BF16"
        assert tuple(f.get_slice("model.layers.0.mlp.odd_proj.weight").get_shape()) == shape
        assert "model.layers.0.mlp.odd_proj.weight_scale_inv" not in f.keys()
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.odd_proj" in config["modules_to_not_convert"]
    checked = run_cli("verify", "--src", src, "--dst", dst)
    assert checked.exit_code == 0 and "verify: OK" in checked.output, checked.output


def test_a_dst_on_a_file_system_that_stores_nothing_is_named_as_such(toy_src):
    result = run_cli("--src", toy_src, "--dst", "/proc/convert-fp8-out", *ARGS)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "convert-fp8: error: /proc/convert-fp8-out: --dst lies on a file system that stores no files (/proc "
        "reports a size of 0, as /proc and /sys do); choose a folder on a disk")
    assert "disk full" not in result.output


def test_verify_never_writes_into_a_folder_that_holds_no_quantized_checkpoint(toy_src, tmp_path):
    src = Path(shutil.copytree(toy_src, tmp_path / "src"))
    digest = tree_digest(src)
    result = run_cli("verify", "--dst", src)
    assert result.exit_code == 1
    assert "config.json has no quantization_config" in result.output
    assert f"report not written: {src} holds no quantized checkpoint" in result.output
    assert tree_digest(src) == digest
    report = tmp_path / "report.json"
    asked = run_cli("verify", "--dst", src, "--report", report)
    assert asked.exit_code == 1 and json.loads(report.read_text())["ok"] is False


def test_excluding_one_expert_is_answered_with_the_experts_module(tmp_path):
    from .model_zoo import save_family

    src = save_family("qwen3_moe", tmp_path / "moe")
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--exclude", "model.layers.1.mlp.experts.0")
    assert result.exit_code != 0
    assert "(it would raw-cast them: --exclude model.layers.1.mlp.experts)" in result.output
    assert "experts.0.down_proj)" not in result.output
    fixed = run_cli("--src", src, "--dst", tmp_path / "out", "--exclude", "model.layers.1.mlp.experts")
    assert fixed.exit_code == 0, fixed.output
