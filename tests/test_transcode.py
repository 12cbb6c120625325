"""An FP8 checkpoint converted into another dialect in one pass: the bytes of `dequantize` then a conversion, in
every pair that makes sense; the same dialect refused; the card says what was done; resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converter.demo import build_checkpoint, gemma4_moe_config
from converter.verify import verify

from .conftest import run_cli, synthetic, tiny_llama, tree_digest


def run(*args) -> None:
    result = run_cli(*map(str, args), "-q")
    assert result.exit_code == 0, result.output


def without_card(folder: Path) -> dict:
    digest = tree_digest(folder)
    del digest["README.md"]
    return digest


def assert_one_pass_is_two_steps(fp8: Path, tmp_path: Path, *target) -> Path:
    """`--src fp8` in one pass against `dequantize` then a conversion of the BF16 copy: every file but the card
    equal, byte for byte."""
    run("dequantize", "--src", fp8, "--dst", tmp_path / "bf16")
    run("--src", tmp_path / "bf16", "--dst", tmp_path / "two-steps", *target)
    run("--src", fp8, "--dst", tmp_path / "one-pass", *target)
    assert without_card(tmp_path / "one-pass") == without_card(tmp_path / "two-steps")
    return tmp_path / "one-pass"


# (how the FP8 source is made from the BF16 one, the target); the target keeps one FP8 weight unquantized
# (--exclude), which is then written as dequantize writes it
PAIRS = [
    (("--block-size", "128"), ("--scale-fmt", "ue8m0")),
    (("--block-size", "128"), ("--scale-fmt", "ue8m0", "--block-size", "128")),
    (("--block-size", "128"), ("--format", "compressed-tensors")),
    (("--block-size", "128"), ("--format", "compressed-tensors", "--scheme", "mxfp8")),
    (("--format", "compressed-tensors"), ()),
    (("--format", "compressed-tensors", "--scheme", "fp8-dynamic"), ()),
    (("--format", "compressed-tensors", "--scheme", "mxfp8"), ("--block-size", "128")),
]


@pytest.mark.parametrize("made,target", PAIRS, ids=lambda a: " ".join(a) or "fp8")
def test_one_pass_equals_dequantize_then_convert(tmp_path, made, target):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    fp8 = tmp_path / "fp8"
    run("--src", src, "--dst", fp8, *made)
    out = assert_one_pass_is_two_steps(fp8, tmp_path, *target, "--exclude", "model.layers.0.mlp.up_proj")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("compressed-tensors" if "--format" in target else "fp8")
    from safetensors import safe_open

    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"  # decoded, kept
        assert f.get_slice("model.layers.1.mlp.up_proj.weight").get_dtype() == "F8_E4M3"
        fp8_weights = sum(f.get_slice(k).get_dtype() == "F8_E4M3" for k in f.keys())
    report = verify(out, fp8)  # the FP8 source read as the conversion read it: every byte re-derived
    assert report.ok, [str(p) for p in report.problems]
    assert report.fp8_tensors == fp8_weights >= 9
    card = (out / "README.md").read_text()
    assert "> Re-quantized from an FP8 checkpoint, `fp8`: " in card
    assert ("> Its weights were decoded to BF16 (as `convert-fp8 dequantize` decodes them) and quantized again. This "
            "is a\n> lossy step on top of the source's own quantization") in card


def test_a_stripe_decoded_in_steps_is_decoded_whole(tmp_path, monkeypatch):
    """Stripes decoded a few rows at a time (bounded temporaries): the same bytes as two steps."""
    from converter.dialects import decoded

    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    run("--src", src, "--dst", tmp_path / "fp8", "--block-size", "128")
    monkeypatch.setattr(decoded, "DECODE_ELEMENTS", 3 * 64 + 1)  # 3 rows of 64 columns, more of narrower ones
    assert_one_pass_is_two_steps(tmp_path / "fp8", tmp_path, "--scale-fmt", "ue8m0")


def test_fused_moe_experts_and_a_dry_run(tmp_path):
    src = build_checkpoint(tmp_path / "moe", gemma4_moe_config())
    fp8 = tmp_path / "fp8"
    run("--src", src, "--dst", fp8, "--config", "gemma-4-26b-a4b-it")
    assert_one_pass_is_two_steps(fp8, tmp_path, "--config", "gemma-4-26b-a4b-it", "--scale-fmt", "ue8m0")
    result = run_cli("--src", fp8, "--dst", tmp_path / "dry", "--config", "gemma-4-26b-a4b-it", "--scale-fmt", "ue8m0",
                     "--dry-run")
    assert result.exit_code == 0, result.output
    assert ("note: the source is FP8 (transformers fp8, E4M3 weights, 64x64 blocks, float scales): its weights are "
            "decoded as dequantize decodes them and quantized again, a lossy step") in result.output.splitlines()


@pytest.mark.parametrize("made,target,what", [
    ((), (), "transformers fp8, E4M3 weights, 64x64 blocks, float scales"),
    (("--scale-fmt", "ue8m0"), ("--scale-fmt", "ue8m0"), "transformers fp8, E4M3 weights, 64x64 blocks, ue8m0 scales"),
    (("--format", "compressed-tensors"), ("--format", "compressed-tensors"),
     "compressed-tensors FP8_BLOCK (float-quantized), E4M3 weights, 128x128 blocks"),
    (("--format", "compressed-tensors", "--scheme", "mxfp8"), ("--format", "compressed-tensors", "--scheme", "mxfp8"),
     "compressed-tensors MXFP8 (mxfp8-quantized), E4M3 weights, one power-of-two (E8M0) scale per 32 columns"),
])
def test_the_source_s_own_dialect_is_refused(tmp_path, made, target, what):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    fp8 = tmp_path / "fp8"
    run("--src", src, "--dst", fp8, *made)
    result = run_cli("--src", fp8, "--dst", tmp_path / "out", *target)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"convert-fp8: error: {fp8}/config.json: the source is already {what}, the dialect and block asked for; "
        "nothing to convert (another --format, --scheme, --scale-fmt or --block-size re-quantizes it)"]
    assert not (tmp_path / "out").exists()


def test_a_quantization_it_cannot_read_is_refused(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    result = run_cli("--src", src, "--dst", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"convert-fp8: error: the source is already quantized (gptq) and cannot be read as FP8: {src}/config.json: "
        "quant_method 'gptq' cannot be dequantized by this tool (it reads compressed-tensors, fp8); give a BF16 "
        "checkpoint"]


def test_sigkill_in_the_middle_of_a_transcode_then_the_same_command(tmp_path):
    from .test_resume import killed_run

    fp8 = tmp_path / "fp8"
    run("--src", synthetic(tmp_path / "toy"), "--dst", fp8, "--block-size", "128", "--max-shard-size", "20MB",
        "--no-arch-check")
    common = ("--src", fp8, "--max-shard-size", "20MB", "--no-arch-check", "--format", "compressed-tensors",
              "--scheme", "mxfp8", "--exclude", "model.layers.1.mlp.up_proj")
    run(*common, "--dst", tmp_path / "reference")
    dst = tmp_path / "resumed"
    killed_run(*common, "--dst", dst, mode=("pieces", "9"))
    assert (dst / ".convert-fp8.partial").is_dir() and not (dst / "config.json").exists()
    result = run_cli(*common, "--dst", dst)
    assert result.exit_code == 0 and "resumed: kept" in result.output, result.output
    assert tree_digest(dst) == tree_digest(tmp_path / "reference")


@pytest.mark.parametrize("first, n", [(0, 96), (37, 50), (90, 6)])
def test_decode_rows_is_torchs_formula_bit_for_bit(first, n):
    """The numpy decoding of a stripe from any row, experts stacked and a ragged last block, against the formula
    torch computes (`float32(q) * scale`, rounded once to BF16): every finite E4M3 code, every bit."""
    import numpy as np
    import torch

    from converter.dialects.decoded import decode_rows

    rng = np.random.default_rng(first)
    rows_per_matrix, cols, block = 48, 200, (32, 64)  # two experts of 48 rows; 200 columns: a last block of 8
    codes = rng.integers(0, 256, (96, cols), dtype=np.uint8)
    codes[0, :128], codes[1, :128] = np.arange(128), np.arange(128, 256)  # every code, in the first two rows
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # but E4M3's NaN codes, which never come out of a quantization
    scales = rng.uniform(1e-4, 3.0, (2 * 2, 4)).astype(np.float32)  # per expert ceil(48/32) = 2 grid rows
    got = decode_rows(codes[first:first + n], scales, block, first, rows_per_matrix)

    rows = torch.arange(first, first + n)
    index = (rows // rows_per_matrix) * 2 + (rows % rows_per_matrix) // block[0]
    expanded = torch.from_numpy(scales)[index].repeat_interleave(block[1], dim=1)[:, :cols]
    fp8 = torch.from_numpy(codes[first:first + n].copy()).view(torch.float8_e4m3fn)
    want = (fp8.to(torch.float32) * expanded).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert got.dtype == np.uint16 and got.shape == (n, cols)
    assert np.array_equal(got, want)
