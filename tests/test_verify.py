"""`convert-fp8 verify`: passes a good conversion and names each planted fault."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.verify import REPORT_NAME, verify

from .conftest import locate, run_cli

Q = "model.language_model.layers.0.self_attn.q_proj.weight"
SCALE = Q + "_scale_inv"


@pytest.fixture
def dst(gemma_dst, tmp_path):
    return shutil.copytree(gemma_dst, tmp_path / "dst")


def patch(folder, name, change):
    """Rewrite a tensor's bytes in place: `change` gets a writable torch tensor of its dtype."""
    shard, info = locate(folder, name)
    dtype = {"F32": torch.float32, "F8_E4M3": torch.uint8}[info.dtype]
    with open(shard, "r+b") as f:
        f.seek(info.offset)
        t = torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=dtype).reshape(info.shape)
        change(t)
        f.seek(info.offset)
        f.write(t.numpy().tobytes())
    return shard


def test_good_conversion_passes_with_and_without_source(gemma_src, dst):
    result = run_cli("verify", "--src", gemma_src, "--dst", dst)
    assert result.exit_code == 0, result.output
    assert "checked 114 tensors (27 FP8)" in result.output and "verify: OK" in result.output
    report = json.loads((dst / REPORT_NAME).read_text())
    assert report["ok"] is True and report["problems"] == [] and len(report["stats"]) == 27
    errors = [s["relative_error"] for s in report["stats"]]
    assert 0.025 < sorted(errors)[len(errors) // 2] < 0.028  # E4M3 with 64x64 scales on N(0, 0.02) weights
    assert max(errors) < 0.1, errors  # the planted outlier coarsens its own tile only
    assert sum(s["zero_tiles"] for s in report["stats"]) == 1  # the planted all-zero tile
    result = run_cli("verify", "--dst", dst)
    assert result.exit_code == 0 and "(no source)" in result.output


def problems_of(gemma_src, dst):
    result = run_cli("verify", "--src", gemma_src, "--dst", dst, "-q")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("verify: FAILED")
    return result.output


def test_scale_doubled(gemma_src, dst):
    shard = patch(dst, SCALE, lambda t: t.mul_(2))
    out = problems_of(gemma_src, dst)
    assert f"tensor {SCALE} in {shard.name}: weight_scale_inv differs from the re-quantized source, first at tile (0, 0)" in out


@pytest.mark.parametrize("chunk", [2**20, 1])
def test_scale_nan(gemma_src, dst, monkeypatch, chunk):
    from converter import verify as verify_module

    monkeypatch.setattr(verify_module, "SCALE_CHECK_BYTES", chunk)  # 1: a row of scales at a time
    patch(dst, SCALE, lambda t: t[1].fill_(float("nan")))
    out = problems_of(gemma_src, dst)
    assert f"tensor {SCALE}" in out and "2 scale(s) not finite and positive, first at tile (1, 0): nan" in out
    assert "verify: FAILED" in run_cli("verify", "--dst", dst).output  # found without the source too


def test_one_fp8_byte_changed(gemma_src, dst):
    patch(dst, Q, lambda t: t[70, 3].bitwise_xor_(1))
    out = problems_of(gemma_src, dst)
    assert f"tensor {Q}" in out and "FP8 bytes differ from the re-quantized source: 1+ byte(s), first at row 70, column 3" in out


def test_weight_zeroed(gemma_src, dst):
    patch(dst, Q, lambda t: t.zero_())
    out = problems_of(gemma_src, dst)
    assert f"tensor {Q}" in out and "every tile of the FP8 weight is zero" in out
    assert "FP8 bytes differ from the re-quantized source" in out


def test_scale_tensor_missing(gemma_src, dst):
    shard, _ = locate(dst, SCALE)
    tensors = load_file(shard)
    del tensors[SCALE]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    del index["weight_map"][SCALE]
    index["metadata"]["total_size"] -= 2 * 2 * 4
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    out = problems_of(gemma_src, dst)
    assert f"tensor {Q} in {shard.name}: FP8 weight without its weight_scale_inv tensor" in out


def test_shard_truncated(gemma_src, dst):
    shard, _ = locate(dst, Q)
    os.truncate(shard, shard.stat().st_size - 1000)
    out = problems_of(gemma_src, dst)
    assert f"in {shard.name}: truncated" in out


def test_quantization_config_removed(gemma_src, dst):
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    out = problems_of(gemma_src, dst)
    assert "config.json has no quantization_config" in out


def test_bf16_linear_not_excluded_in_config_is_named(dst):
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
    (dst / "config.json").write_text(json.dumps(config))
    report = verify(dst, arch_check=False)
    messages = [str(p) for p in report.problems]
    name = "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"
    assert any(m.startswith(f"tensor {name}") and "transformers would raw-cast it to FP8" in m for m in messages)


def test_missing_output_folder(tmp_path):
    result = run_cli("verify", "--dst", tmp_path / "none")
    assert result.exit_code == 1 and "output folder not found" in result.output


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E8M0"])
def test_scales_of_every_dtype_decode_as_torch_casts_them(dtype):
    import numpy as np

    from converter.dialects.transformers_fp8 import decode_scale_bytes

    if dtype == "F8_E8M0":
        raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        want = raw.view(torch.float8_e8m0fnu).to(torch.float32)
    else:
        values = torch.tensor([1.5, -2.0, 3e-38, 448.0, 65504.0, float("inf"), float("nan"), 1e-7, 0.0])
        raw = values.to({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype])
        want = raw.to(torch.float32)
    got = decode_scale_bytes(raw.view(torch.uint8).numpy().tobytes(), dtype)
    assert got.dtype == np.float32 and np.array_equal(got, want.numpy(), equal_nan=True)


def test_a_source_that_cannot_be_read_is_a_problem_not_a_crash(dst, tmp_path):
    result = run_cli("verify", "--src", tmp_path / "missing", "--dst", dst, "--no-arch-check", "-q")
    assert result.exit_code == 1
    assert result.output == (f"problem: source: {tmp_path / 'missing'}: source folder not found\n"
                             "verify: FAILED with 1 problem(s)\n")


def _experts_checkpoint(path, experts=24):
    """Many small expert Linears of one shape (checked together, stacked), in two shards."""
    gen = torch.Generator().manual_seed(3)
    path.mkdir()
    names = [f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(experts) for p in ("gate_proj", "up_proj")]
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: (torch.randn(128, 256, generator=gen) * 0.02).bfloat16() for n in part}, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


def test_small_weights_checked_together_each_fault_named_on_its_own_weight(tmp_path):
    src = _experts_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("--src", src, "--dst", out, "-q", "--no-arch-check").exit_code == 0
    clean = verify(out, src, arch_check=False)
    assert clean.ok and clean.fp8_tensors == 48 and len(clean.stats) == 48
    byte = "model.layers.0.mlp.experts.7.up_proj.weight"
    scale = "model.layers.0.mlp.experts.11.gate_proj.weight_scale_inv"
    zeroed = "model.layers.0.mlp.experts.20.gate_proj.weight"
    patch(out, byte, lambda t: t[65, 130].bitwise_xor_(1))
    patch(out, scale, lambda t: t[1, 2].mul_(2))
    patch(out, zeroed, lambda t: t.zero_())
    report = verify(out, src, arch_check=False)
    found = {(p.tensor, p.what) for p in report.problems}
    assert (byte, "FP8 bytes differ from the re-quantized source: 1+ byte(s), first at row 65, column 130") in found
    assert (scale, "weight_scale_inv differs from the re-quantized source, first at tile (1, 2)") in found
    assert (zeroed, "every tile of the FP8 weight is zero") in found
    assert {t for t, _ in found} == {byte, scale, zeroed}
    stats = {s.tensor: s for s in report.stats}
    assert [s.tensor for s in report.stats] == [s.tensor for s in clean.stats]  # in the output's order
    assert stats[zeroed].zero_tiles == 8 and stats[zeroed].relative_error == pytest.approx(1.0)
    same = [n for n in stats if n not in (byte, scale.removesuffix("_scale_inv"), zeroed)]
    before = {s.tensor: s.relative_error for s in clean.stats}
    assert [stats[n].relative_error for n in same] == pytest.approx([before[n] for n in same], rel=1e-9)
    assert stats[byte].relative_error != before[byte]  # the changed byte is in its own weight's figures


def test_a_bad_scale_among_scales_checked_together_is_named_on_its_own_tensor(tmp_path):
    src = _experts_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("--src", src, "--dst", out, "-q", "--no-arch-check").exit_code == 0
    scales = [f"model.layers.0.mlp.experts.{e}.up_proj.weight_scale_inv" for e in (0, 9, 23)]
    every = sorted(locate(out, n)[1].offset for n in json.loads((out / "model.safetensors.index.json").read_text())
                   ["weight_map"] if n.endswith("_scale_inv"))
    assert len(every) == 48 and every[-1] - every[0] == 47 * 32  # adjacent in the file: checked together
    patch(out, scales[1], lambda t: t[0, 3].fill_(float("inf")))
    patch(out, scales[2], lambda t: t[1, 0].fill_(-1.0))
    report = verify(out, arch_check=False, data=False)
    assert sorted((p.tensor, p.what) for p in report.problems) == [
        (scales[2], "1 scale(s) not finite and positive, first at tile (1, 0): -1.0"),
        (scales[1], "1 scale(s) not finite and positive, first at tile (0, 3): inf")]
