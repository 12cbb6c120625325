"""`convert-fp8 dequantize`: FP8 back to BF16 with the values transformers computes on load; round trips to the
same FP8 bytes; DeepSeek-V3-style and UE8M0 sources; resume after a kill; one-line refusals."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

from converter import decode as dq
from converter.demo import build_checkpoint, gemma4_moe_config

from .conftest import read_json, run_cli, tree_digest
from .test_convert import load_all, raw

HERE = Path(__file__).parent


def transformers_dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """transformers' own `Fp8Dequantize` on one weight and its scales."""
    return Fp8Dequantize(None)._dequantize_one(fp8, scale_inv, output_dtype=dtype)


def float64_dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block, dtype=torch.bfloat16) -> torch.Tensor:
    """An independent reference for any grid (a last block cut short too): the product of an E4M3 value (4
    significant bits) and a float32 (24) is exact in float64, so rounding it to float32 is what a float32
    multiply gives."""
    *_, rows, cols = fp8.shape
    s = scale_inv.double().repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)
    return (fp8.double() * s[..., :cols]).float().to(dtype)


def tensors_of(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, sharded or one `model.safetensors`."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    return load_all(folder)[1]


def scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def fp8_checkpoint(path: Path, tensors: dict, qc: dict, config: dict | None = None) -> Path:
    """A one-file FP8 checkpoint from ready tensors, with `qc` as its quantization_config."""
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**(config or {"model_type": "toy"}), "quantization_config": qc}))
    return path


def dequantized(src: Path, dst: Path, *args) -> Path:
    result = run_cli("dequantize", "--src", src, "--dst", dst, *args)
    assert result.exit_code == 0, result.output
    return dst


def converted(src: Path, dst: Path, *args) -> Path:
    result = run_cli("--src", src, "--dst", dst, *args)
    assert result.exit_code == 0, result.output
    return dst


@pytest.fixture(scope="module")
def gemma_bf16(gemma_dst, tmp_path_factory):
    return dequantized(gemma_dst, tmp_path_factory.mktemp("deq") / "bf16", "--max-shard-size", "300KB")


def moe_128_config():
    """The MoE structure with widths that tile by 128, so that its experts are FP8 with 128x128 blocks too."""
    config = gemma4_moe_config()
    config.text_config.hidden_size = 256
    config.text_config.moe_intermediate_size = 128
    return config


# --- the values: transformers' own dequantization ---------------------------------------------------------------


def test_every_weight_is_what_transformers_loads_and_the_rest_is_copied(gemma_dst, gemma_bf16):
    from transformers import Gemma4ForConditionalGeneration

    _, fp8 = load_all(gemma_dst)
    _, out = load_all(gemma_bf16)
    weights = sorted(n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn)
    assert len(weights) == 27
    assert set(out) == set(fp8) - {scale_name(n) for n in weights}
    loaded = Gemma4ForConditionalGeneration.from_pretrained(gemma_dst, dtype=torch.bfloat16).state_dict()
    for name in weights:
        assert out[name].dtype == torch.bfloat16
        assert raw(out[name]) == raw(loaded[name]), name  # what transformers' loader made of the FP8 weight
        assert raw(out[name]) == raw(transformers_dequantize(fp8[name], fp8[scale_name(name)])), name
    for name in set(out) - set(weights):
        assert raw(out[name]) == raw(fp8[name]), name


def test_transformers_loads_it_with_every_key_and_the_fp8_logits(gemma_dst, gemma_bf16):
    from transformers import Gemma4ForConditionalGeneration

    model, info = Gemma4ForConditionalGeneration.from_pretrained(gemma_bf16, dtype=torch.bfloat16,
                                                                 output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    fp8_model = Gemma4ForConditionalGeneration.from_pretrained(gemma_dst, dtype=torch.bfloat16)
    ids = torch.tensor([[2, 10, 11, 12, 13, 40, 41, 300]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, fp8_model(input_ids=ids).logits
    assert ours.shape == (1, 8, 512) and torch.equal(ours, theirs)


def test_config_card_and_files(gemma_src, gemma_dst, gemma_bf16):
    config = read_json(gemma_bf16 / "config.json")
    assert "quantization_config" not in config and config == read_json(gemma_src / "config.json")
    card = (gemma_bf16 / "README.md").read_text()
    assert card.startswith("---\ntags:\n- convert-fp8\n- bfloat16\n---\n# fp8, dequantized to bfloat16\n")
    assert "27 FP8 weights dequantized" in card and "transformers fp8, E4M3 weights, 64x64 blocks" in card
    pooling = "1_Pooling/config.json"
    assert (gemma_bf16 / pooling).read_bytes() == (gemma_dst / pooling).read_bytes()
    index = read_json(gemma_bf16 / "model.safetensors.index.json")
    assert not any(n.endswith("_scale_inv") for n in index["weight_map"])
    tensors = load_all(gemma_bf16)[1].values()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors)


def test_card_keeps_the_source_licence_and_names_the_hub_id(gemma_dst, tmp_path):
    src = shutil.copytree(gemma_dst, tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: google/gemma-4-tiny\ntags:\n- fp8\n- gemma\n"
                                   "---\n# the FP8 card\n")
    card = (dequantized(src, tmp_path / "o", "--base-model", "me/gemma-4-tiny-FP8") / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: me/gemma-4-tiny-FP8\ntags:\n- gemma\n- bfloat16\n"
                           "- convert-fp8\n---\n# gemma-4-tiny-FP8, dequantized to bfloat16\n")


def test_dry_run_prints_the_plan_and_writes_nothing(gemma_dst, tmp_path):
    result = run_cli("dequantize", "--src", gemma_dst, "--dst", tmp_path / "o", "--dry-run",
                     "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "source: transformers fp8, E4M3 weights, 64x64 blocks, float scales",
        "27 FP8 weights to BF16, 27 scale tensors dropped, 60 tensors copied; 7 shard(s)",
        "source tensors 1.06 MB -> output tensors 1.72 MB",
        "other files copied: 5",
        "not copied: README.md (replaced by the dequantized model card)",
        "dry run: nothing written",
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype,torch_dtype,name",
                         [("f16", torch.float16, "float16"), ("f32", torch.float32, "float32")])
def test_other_dtypes_match_transformers(gemma_dst, tmp_path, dtype, torch_dtype, name):
    out_dir = dequantized(gemma_dst, tmp_path / dtype, "--dtype", dtype)
    _, fp8 = load_all(gemma_dst)
    _, out = load_all(out_dir)
    weights = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    for n in weights:
        assert out[n].dtype == torch_dtype
        assert raw(out[n]) == raw(transformers_dequantize(fp8[n], fp8[scale_name(n)], torch_dtype)), n
    assert read_json(out_dir / "config.json")["dtype"] == name


def test_many_stripes_give_the_same_bytes(gemma_dst, gemma_bf16, tmp_path, monkeypatch):
    monkeypatch.setattr(dq, "STRIPE_BYTES", 64 * 64)  # one block row per stripe
    out_dir = dequantized(gemma_dst, tmp_path / "o", "--max-shard-size", "300KB")
    assert tree_digest(out_dir) == tree_digest(gemma_bf16)


# --- round trips: our own outputs ----------------------------------------------------------------------------------


def without_card(folder: Path) -> dict:
    """`tree_digest` less the model card, whose text tells where a checkpoint came from (for a round trip, from the
    dequantized copy rather than the original source)."""
    digest = tree_digest(folder)
    assert "README.md" in digest
    del digest["README.md"]
    return digest


def assert_round_trip(src: Path, tmp_path: Path, *convert_args) -> dict:
    """convert, dequantize, convert again: the second FP8 checkpoint is the first, byte for byte."""
    fp8 = converted(src, tmp_path / "fp8", *convert_args)
    bf16 = dequantized(fp8, tmp_path / "bf16")
    again = converted(bf16, tmp_path / "again", *convert_args)
    assert without_card(again) == without_card(fp8)
    return load_all(fp8)[1]


def test_round_trip_dense_64(gemma_dst, gemma_bf16, tmp_path):
    again = converted(gemma_bf16, tmp_path / "again", "--max-shard-size", "300KB")
    assert without_card(again) == without_card(gemma_dst)
    assert len(without_card(gemma_dst)) == 11  # 4 shards, index, config and 5 other files


def test_round_trip_dense_128(gemma_src, tmp_path):
    fp8 = assert_round_trip(gemma_src, tmp_path, "--block-size", "128")
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) == 22


def test_round_trip_ue8m0_scales(gemma_src, tmp_path):
    fp8 = assert_round_trip(gemma_src, tmp_path, "--scale-fmt", "ue8m0")
    assert fp8["model.language_model.layers.0.mlp.up_proj.weight_scale_inv"].dtype == torch.float8_e8m0fnu


def test_round_trip_moe_64(tmp_path):
    src = build_checkpoint(tmp_path / "gemma-4-moe", gemma4_moe_config())
    fp8 = assert_round_trip(src, tmp_path, "--config", "gemma-4-26b-a4b-it")
    experts = [n for n, t in fp8.items() if n.endswith("experts.gate_up_proj")]
    assert len(experts) == 2 and fp8[experts[0]].dtype == torch.float8_e4m3fn


def test_round_trip_moe_128_and_experts_match_transformers(tmp_path):
    src = build_checkpoint(tmp_path / "gemma-4-moe-128", moe_128_config())
    fp8 = assert_round_trip(src, tmp_path, "--config", "gemma-4-26b-a4b-it", "--block-size", "128")
    _, out = load_all(tmp_path / "bf16")
    experts = sorted(n for n, t in fp8.items() if ".experts." in n and t.dtype == torch.float8_e4m3fn)
    assert len(experts) == 4
    for name in experts:  # transformers 5.24 does not dequantize experts on load: its own op is the reference
        s = fp8[name + "_scale_inv"]
        assert s.shape == (4, fp8[name].shape[1] // 128, fp8[name].shape[2] // 128)
        assert raw(out[name]) == raw(transformers_dequantize(fp8[name], s)), name
    from transformers import Gemma4ForConditionalGeneration

    _, info = Gemma4ForConditionalGeneration.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


# --- other dialects: UE8M0 scales, DeepSeek-V3 style, non-square blocks ------------------------------------------


def test_ue8m0_scales_made_by_transformers(gemma_src, gemma_dst, tmp_path):
    """A UE8M0 checkpoint quantized by transformers' own `Fp8Quantize(scale_fmt="ue8m0")`, dequantized to what
    transformers loads from it."""
    from transformers import Gemma4ForConditionalGeneration

    class Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=(64, 64), scale_fmt="ue8m0")

    _, src = load_all(gemma_src)
    _, ours = load_all(gemma_dst)
    tensors = {}
    for name, t in src.items():
        tensors.update(Fp8Quantize(Quantizer()).convert({name: t}) if ours[name].dtype == torch.float8_e4m3fn
                       else {name: t})
    qc = {**read_json(gemma_dst / "config.json")["quantization_config"], "scale_fmt": "ue8m0"}
    ckpt = fp8_checkpoint(tmp_path / "ue8m0", tensors, qc, read_json(gemma_src / "config.json"))
    assert tensors["model.language_model.layers.0.mlp.up_proj.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gemma_src / f, ckpt / f)
    out_dir = dequantized(ckpt, tmp_path / "bf16")
    out = tensors_of(out_dir)
    loaded = Gemma4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).state_dict()
    weights = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert len(weights) == 27
    for name in weights:
        assert raw(out[name]) == raw(loaded[name]), name
    assert "ue8m0 scales" in (out_dir / "README.md").read_text()


def test_deepseek_v3_style_with_blocks_cut_short_and_experts(tmp_path):
    """128x128 blocks, `fmt: e4m3`, a 576-row projection whose last block row is cut short (as DeepSeek-V3's
    kv_a_proj_with_mqa), a 2-D FP8 weight next to BF16 ones, and 3-D experts whose rows do not divide."""
    gen = torch.Generator().manual_seed(3)
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    shapes = {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (576, 320),
              "model.layers.0.mlp.experts": (3, 200, 256), "model.layers.0.mlp.down_proj.weight": (256, 384)}
    tensors = {"model.embed_tokens.weight": torch.randn(64, 320, generator=gen).to(torch.bfloat16)}
    for name, shape in shapes.items():
        *lead, rows, cols = shape
        tensors[name] = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[scale_name(name)] = torch.rand((*lead, -(-rows // 128), -(-cols // 128)), generator=gen) * 1e-3
    src = fp8_checkpoint(tmp_path / "ds", tensors, qc, {"model_type": "deepseek_v3", "torch_dtype": "bfloat16"})
    out_dir = dequantized(src, tmp_path / "bf16", "--dtype", "f32")
    out = tensors_of(out_dir)
    assert set(out) == {"model.embed_tokens.weight", *shapes}
    for name in shapes:
        assert raw(out[name]) == raw(float64_dequantize(tensors[name], tensors[scale_name(name)], (128, 128),
                                                        torch.float32)), name
    name = "model.layers.0.mlp.down_proj.weight"  # a grid that divides: transformers' op agrees
    assert raw(out[name]) == raw(transformers_dequantize(tensors[name], tensors[scale_name(name)], torch.float32))
    assert read_json(out_dir / "config.json") == {"model_type": "deepseek_v3", "torch_dtype": "float32"}
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "model.safetensors.index.json").exists()


def test_non_square_blocks(tmp_path):
    gen = torch.Generator().manual_seed(4)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 128]}
    w = (torch.randn(192, 256, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, generator=gen)
    src = fp8_checkpoint(tmp_path / "ns", {"m.weight": w, "m.weight_scale_inv": s}, qc)
    out = tensors_of(dequantized(src, tmp_path / "o"))
    assert raw(out["m.weight"]) == raw(transformers_dequantize(w, s))
    assert raw(out["m.weight"]) == raw(float64_dequantize(w, s, (64, 128)))


# --- refusals ------------------------------------------------------------------------------------------------------


def refused(src: Path, tmp_path: Path) -> str:
    result = run_cli("dequantize", "--src", src, "--dst", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out").exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def tiny(**extra) -> dict:
    gen = torch.Generator().manual_seed(5)
    return {"m.weight": (torch.randn(128, 128, generator=gen) * 50).to(torch.float8_e4m3fn),
            "m.weight_scale_inv": torch.ones(2, 2), **extra}


QC = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]}


def test_refuses_a_bf16_checkpoint(gemma_src, tmp_path):
    assert refused(gemma_src, tmp_path) == (f"convert-fp8: error: {gemma_src}/config.json: no quantization_config: "
                                            "not an FP8 checkpoint, nothing to dequantize")


def test_refuses_another_quant_method_by_name(tmp_path):
    src = fp8_checkpoint(tmp_path / "awq", tiny(), {"quant_method": "awq"})
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/config.json: quant_method 'awq' cannot be "
                                      "dequantized by this tool (it reads compressed-tensors, fp8)")


def test_refuses_a_weight_without_its_scale(tmp_path):
    tensors = tiny()
    del tensors["m.weight_scale_inv"]
    src = fp8_checkpoint(tmp_path / "noscale", tensors, QC)
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/model.safetensors: FP8 weight m.weight has no "
                                      "scale m.weight_scale_inv in the checkpoint")


def test_refuses_a_scale_grid_that_does_not_fit(tmp_path):
    src = fp8_checkpoint(tmp_path / "grid", tiny(**{"m.weight_scale_inv": torch.ones(2, 3)}), QC)
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/model.safetensors: scale m.weight_scale_inv has "
                                      "shape [2, 3], but weight m.weight [128, 128] in 64x64 blocks needs [2, 2]")


def test_refuses_nan_scales_and_removes_what_it_wrote(tmp_path):
    scales = torch.ones(2, 2)
    scales[1, 0] = float("nan")
    src = fp8_checkpoint(tmp_path / "nan", tiny(**{"m.weight_scale_inv": scales}), QC)
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/model.safetensors: scale m.weight_scale_inv is "
                                      "nan at block (1, 0); the checkpoint is damaged")


def test_a_conversion_from_fp8_refuses_nan_scales_as_dequantize_does(tmp_path):
    scales = torch.ones(2, 2)
    scales[1, 0] = float("nan")
    src = fp8_checkpoint(tmp_path / "nan", tiny(**{"m.weight_scale_inv": scales}), QC)
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--scale-fmt", "ue8m0", "--no-arch-check", "-q")
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out").exists()
    assert result.output.strip().splitlines() == [f"convert-fp8: error: {src}/model.safetensors: scale "
                                                  "m.weight_scale_inv is nan at block (1, 0); the checkpoint is damaged"]


def test_refuses_a_scale_of_no_weight(tmp_path):
    src = fp8_checkpoint(tmp_path / "orphan", tiny(**{"n.weight_scale_inv": torch.ones(1)}), QC)
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/model.safetensors: scale n.weight_scale_inv "
                                      "belongs to no FP8 weight (n.weight is missing or not F8_E4M3)")


# --- resume ------------------------------------------------------------------------------------------------------


def test_sigkill_then_same_command_gives_the_same_bytes(gemma_dst, gemma_bf16, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    args = ("dequantize", "--src", gemma_dst, "--dst", dst, "--max-shard-size", "300KB")
    done = subprocess.run([sys.executable, str(HERE / "kill_after.py"), "pieces", "30", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "CONVERT_FP8_NO_PROGRESS": "1"})
    assert done.returncode == -9, done.stderr[-2000:]
    staging = dst / ".convert-fp8.partial"
    assert len((staging / "manifest-part-1-of-1.jsonl").read_text().splitlines()) == 30
    assert not (dst / "config.json").exists()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "resumed: kept" in result.output
    assert tree_digest(dst) == tree_digest(gemma_bf16) and not staging.exists()


def test_finalize_refuses_a_dequantize_run_and_leaves_it_to_resume(gemma_dst, tmp_path):
    dst = tmp_path / "out"
    done = subprocess.run([sys.executable, str(HERE / "kill_after.py"), "pieces", "5", "dequantize", "--src",
                           str(gemma_dst), "--dst", str(dst), "--max-shard-size", "300KB"],
                          capture_output=True, text=True, env={**os.environ, "CONVERT_FP8_NO_PROGRESS": "1"})
    assert done.returncode == -9, done.stderr[-2000:]
    staging = dst / ".convert-fp8.partial"
    before = tree_digest(staging)
    result = run_cli("finalize", "--dst", dst)
    assert result.exit_code == 2
    assert result.stderr == (f"convert-fp8: error: {dst}: holds an unfinished `convert-fp8 dequantize` run, not a "
                             "conversion; rerun the same `convert-fp8 dequantize` command to resume it\n")
    assert tree_digest(staging) == before


def test_a_conversion_left_in_dst_is_refused(gemma_src, gemma_dst, tmp_path):
    dst = tmp_path / "out"
    done = subprocess.run([sys.executable, str(HERE / "kill_after.py"), "pieces", "5", "--src", str(gemma_src),
                           "--dst", str(dst)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    result = run_cli("dequantize", "--src", gemma_dst, "--dst", dst)
    assert result.exit_code == 2
    assert "holds the partial output of a different conversion" in result.output


def test_the_torch_formula_without_numba_gives_the_same_bytes(gemma_dst, gemma_bf16, tmp_path, monkeypatch):
    from converter import dequantize_fast

    monkeypatch.setattr(dequantize_fast, "available", lambda: False)
    out_dir = dequantized(gemma_dst, tmp_path / "o", "--max-shard-size", "300KB")
    assert tree_digest(out_dir) == tree_digest(gemma_bf16)


@pytest.mark.parametrize("parallel", [True, False], ids=["threads", "serial"])
def test_lookup_tables_give_the_torch_formula_on_every_code_and_extreme_scales(parallel, monkeypatch):
    import numpy as np

    from converter import dequantize_fast
    from converter.dequantize_fast import dequantize_into

    # a stripe this small runs the serial kernel; with the threshold at 0, the threaded one
    monkeypatch.setattr(dequantize_fast, "PARALLEL_MIN_CODES", 0 if parallel else 1 << 20)
    real = dequantize_fast._kernel
    used = []
    monkeypatch.setattr(dequantize_fast, "_kernel", lambda size, threads: used.append(threads) or real(size, threads))

    codes = torch.arange(256, dtype=torch.uint8).repeat(200, 1)[:, torch.randperm(256)].contiguous()  # NaN codes too
    scales = torch.exp2(torch.randint(-149, 128, (4, 3)).float()) * (1 + torch.rand(4, 3))
    scales[0, 0], scales[1, 1], scales[2, 2] = float("inf"), 0.0, torch.finfo(torch.float32).max
    for name, dtype, bits, np_bits in [("BF16", torch.bfloat16, torch.uint16, np.uint16),
                                       ("F16", torch.float16, torch.uint16, np.uint16),
                                       ("F32", torch.float32, torch.uint32, np.uint32)]:
        ref = dq.dequantize_rows(codes.view(torch.float8_e4m3fn), scales, (64, 100), dtype).view(bits).numpy()
        out = np.empty((200, 256), np_bits)
        dequantize_into(codes.numpy(), scales.numpy(), (64, 100), name, out)  # blocks cut short both ways
        assert (out == ref).all(), name
    assert used == [parallel] * 3


def test_numpy_tables_decode_e4m3_and_round_as_torch_does():
    """The tables are built without torch: every E4M3 code's float32 bits, and the rounding of float32 values
    (NaN, infinities, ties, F16 overflow and subnormals) to BF16 and F16 bits, equal torch's."""
    import numpy as np

    from converter.dequantize_fast import e4m3_values, float32_to_bits

    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    assert (e4m3_values().view(np.uint32) == theirs.view(torch.int32).numpy().view(np.uint32)).all()
    bits = torch.randint(0, 2**32, (1 << 20,), dtype=torch.int64).to(torch.uint32)
    edges = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000,
                          0x477FF000, 0x477FE000, 0x33000000, 0x00000001, 0x80000000], dtype=torch.int64).to(torch.uint32)
    values = torch.cat([bits, edges]).view(torch.float32)
    for name, dtype, as_bits in [("BF16", torch.bfloat16, torch.uint16), ("F16", torch.float16, torch.uint16)]:
        ours = float32_to_bits(values.numpy(), name)
        assert (ours == values.to(dtype).view(as_bits).numpy()).all(), name


def test_dequantize_runs_without_torch_and_gives_the_same_bytes(gemma_dst, gemma_bf16, tmp_path):
    """With numba, a dequantization needs no torch (whose import alone is about 220 MB of resident memory): run
    with `import torch` made to fail, it writes the bytes of the torch-checked output."""
    import subprocess
    import sys

    dst = tmp_path / "o"
    code = ("import sys; sys.modules['torch'] = None; from converter.cli import main; "
            "sys.argv = ['convert-fp8', *sys.argv[1:]]; main()")
    done = subprocess.run([sys.executable, "-c", code, "dequantize", "--src", str(gemma_dst), "--dst", str(dst),
                           "--max-shard-size", "300KB", "-q"], capture_output=True, text=True,
                          env=dict(os.environ, CONVERT_FP8_NO_PROGRESS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree_digest(dst) == tree_digest(gemma_bf16)


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None},
     "quantization_config.weight_block_size is None; only block-wise FP8 (two positive block edges, e.g. [128, 128]) "
     "can be dequantized"),
    ({**QC, "fmt": "e5m2"}, "quantization_config.fmt is 'e5m2'; only e4m3 weights can be dequantized"),
    ({**QC, "activation_scheme": "static"},
     "activation_scheme 'static': only dynamic activation scales can be dequantized (static ones store activation "
     "scales this tool does not drop)"),
    ({**QC, "scale_fmt": "e4m3"}, "quantization_config.scale_fmt is 'e4m3'; expected float or ue8m0"),
])
def test_refuses_configs_it_cannot_read(tmp_path, qc, message):
    src = fp8_checkpoint(tmp_path / "cfg", tiny(), qc)
    assert refused(src, tmp_path) == f"convert-fp8: error: {src}/config.json: {message}"


def test_from_the_hub_with_low_disk(gemma_dst, gemma_bf16, tmp_path):
    """Online, against a local stand-in for the Hub: the card names the repo and its commit, and with --low-disk
    no shard is left in the cache."""
    from .fake_hub import COMMIT, FakeHub

    cache = tmp_path / "hub"
    with FakeHub("acme/tiny-FP8", gemma_dst) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), CONVERT_FP8_NO_PROGRESS="1",
                   HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-m", "converter.cli", "dequantize", "--src", "acme/tiny-FP8", "--dst",
                               str(tmp_path / "out"), "--max-shard-size", "300KB", "--low-disk", "-q"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_card(tmp_path / "out") == without_card(gemma_bf16)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: acme/tiny-FP8\n") and f"`acme/tiny-FP8` at commit `{COMMIT}`" in card
    assert list(cache.rglob("*.safetensors")) == []
    assert [p for p in cache.rglob("blobs/*") if p.stat().st_size > 100_000] == []  # shards are about 300 kB


def test_ue8m0_exponent_bytes(tmp_path):
    """UE8M0 scales stored as U8 exponents (2 ** (byte - 127)), as transformers reads MXFP8 checkpoints."""
    gen = torch.Generator().manual_seed(6)
    qc = {**QC, "scale_fmt": "ue8m0"}
    w = (torch.randn(128, 192, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.randint(100, 140, (2, 3), dtype=torch.uint8, generator=gen)
    src = fp8_checkpoint(tmp_path / "u8", {"m.weight": w, "m.weight_scale_inv": s}, qc)
    out = tensors_of(dequantized(src, tmp_path / "o"))
    assert raw(out["m.weight"]) == raw(transformers_dequantize(w, s))
    assert out["m.weight"][0, 0].item() == pytest.approx(w[0, 0].float().item() * 2.0 ** (s[0, 0].item() - 127))


def test_e8m0_scales_read_from_their_bytes_as_torch_casts_them(tmp_path):
    from converter.dialects.transformers_fp8 import decode_scale_bytes

    codes = torch.arange(256, dtype=torch.uint8)
    ours = torch.from_numpy(decode_scale_bytes(bytearray(codes.numpy().tobytes()), "F8_E8M0"))
    assert torch.equal(ours[:255], codes[:255].view(torch.float8_e8m0fnu).to(torch.float32)) and ours[255].isnan()
    scales = torch.ones(2, 2).to(torch.float8_e8m0fnu)
    scales.view(torch.uint8)[0, 1] = 255  # E8M0's NaN
    src = fp8_checkpoint(tmp_path / "nan", tiny(**{"m.weight_scale_inv": scales}), {**QC, "scale_fmt": "ue8m0"})
    assert refused(src, tmp_path) == (f"convert-fp8: error: {src}/model.safetensors: scale m.weight_scale_inv is "
                                      "nan at block (0, 1); the checkpoint is damaged")


# --- compressed-tensors sources ------------------------------------------------------------------------------------


def ct_decompressed(path: Path) -> dict:
    """compressed-tensors' own decompression of a checkpoint: transformers loads it with
    `CompressedTensorsConfig(run_compressed=False)`, so `ModelCompressor.decompress_model` turns every quantized
    Linear back into a dense weight. Returns those weights (the checkpoint's FP8 ones) by name."""
    import transformers
    from transformers import CompressedTensorsConfig

    arch = read_json(path / "config.json")["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path, dtype="auto",
                                                       quantization_config=CompressedTensorsConfig(run_compressed=False))
    state = model.state_dict()
    fp8 = [n for n, t in tensors_of(path).items() if t.dtype == torch.float8_e4m3fn]
    return {name: state[name] for name in fp8}


CT_SCHEMES = [("fp8-block",), ("fp8-block", "--block-size", "64"), ("fp8-dynamic",), ("mxfp8",), ("mxfp8a16",)]


@pytest.mark.parametrize("scheme", CT_SCHEMES, ids=lambda s: "-".join(s))
def test_compressed_tensors_equals_its_own_decompression(tmp_path, scheme):
    from .conftest import tiny_llama

    src = tiny_llama(tmp_path / "llama", intermediate_size=200)  # down_proj 128x200: kept in BF16 and ignored
    fp8 = converted(src, tmp_path / "ct", "--format", "compressed-tensors", "--scheme", *scheme)
    bf16 = dequantized(fp8, tmp_path / "bf16")
    out, source, ref = tensors_of(bf16), tensors_of(src), ct_decompressed(fp8)
    assert len(ref) == (12 if scheme[0] != "fp8-dynamic" else 14) and set(out) == set(source)
    for name, weight in ref.items():
        assert weight.dtype == out[name].dtype == torch.bfloat16
        assert raw(out[name]) == raw(weight), name
    for name in set(out) - set(ref):  # the ignored Linears, embeddings and norms: copied
        assert raw(out[name]) == raw(source[name]), name
    assert read_json(bf16 / "config.json") == read_json(src / "config.json")  # quantization_config removed
    card = (bf16 / "README.md").read_text()
    assert "the values compressed-tensors computes when it decompresses the checkpoint" in card


@pytest.mark.parametrize("scheme", CT_SCHEMES[:3], ids=lambda s: "-".join(s))
def test_compressed_tensors_round_trip(gemma_src, tmp_path, scheme):
    args = ("--format", "compressed-tensors", "--scheme", *scheme)
    fp8 = converted(gemma_src, tmp_path / "fp8", *args)
    again = converted(dequantized(fp8, tmp_path / "bf16"), tmp_path / "again", *args)
    assert without_card(again) == without_card(fp8)


def test_mxfp8_round_trip_doubles_the_scale_of_groups_at_448_and_then_holds(tmp_path):
    """MXFP8's scale rounds a group's maximum up to the next power of two from 1.75 * 2**k, so a group whose
    largest E4M3 value is 448 (1.75 * 2**8) comes back with twice its scale: that group's exponent grows by one,
    every other byte is kept, and a second round trip changes nothing."""
    from .conftest import tiny_llama

    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    args = ("--format", "compressed-tensors", "--scheme", "mxfp8", "--max-shard-size", "10GB")
    first = converted(src, tmp_path / "fp8", *args)
    second = converted(dequantized(first, tmp_path / "bf16"), tmp_path / "fp8-2", *args)
    third = converted(dequantized(second, tmp_path / "bf16-2"), tmp_path / "fp8-3", *args)
    assert without_card(third) == without_card(second)
    a, b = tensors_of(first), tensors_of(second)
    moved = 0
    for name in (n for n in a if n.endswith(".weight_scale")):
        q = a[name.removesuffix("_scale")].float().abs()
        at_448 = q.reshape(q.shape[0], -1, 32).amax(dim=-1) == 448
        assert torch.equal(b[name].int() - a[name].int(), at_448.int()), name
        moved += int(at_448.sum())
    assert moved > 0


def ct_qc(strategy="tensor", fmt="float-quantized", **weights) -> dict:
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False, **weights}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"format": fmt, "targets": ["Linear"], "weights": args,
                                          "input_activations": acts}}}


def test_per_tensor_fp8_with_static_activation_scales(tmp_path):
    """Per-tensor FP8 weights with static per-tensor activation scales (compressed-tensors' FP8 preset, which
    llm-compressor's oneshot writes and this tool does not): the weights dequantized, `input_scale` dropped."""
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(96, 160, generator=gen) * 60).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.0123], dtype=torch.bfloat16)
    tensors = {"m.weight": q, "m.weight_scale": scale, "m.input_scale": torch.tensor([0.5], dtype=torch.bfloat16),
               "norm.weight": torch.ones(160, dtype=torch.bfloat16)}
    src = fp8_checkpoint(tmp_path / "ct", tensors, ct_qc())
    result = run_cli("dequantize", "--src", src, "--dst", tmp_path / "o", "--dry-run")
    assert result.output.splitlines()[:2] == [
        "source: compressed-tensors group_0 (float-quantized), E4M3 weights, one scale per tensor, static activation "
        "scales dropped",
        "1 FP8 weights to BF16, 1 scale tensors dropped, 1 tensors copied; 1 shard(s)"]
    out = tensors_of(dequantized(src, tmp_path / "bf16"))
    assert sorted(out) == ["m.weight", "norm.weight"]
    assert raw(out["m.weight"]) == raw(q.to(torch.bfloat16) * scale)  # compressed-tensors' product, in BF16


@pytest.mark.parametrize("qc,tensors,message", [
    (ct_qc(fmt="pack-quantized"), {}, "compressed-tensors format 'pack-quantized' cannot be dequantized by this tool "
     "(it reads float-quantized, mxfp8-quantized)"),
    (ct_qc(num_bits=4), {}, "compressed-tensors weights {'num_bits': 4, 'type': 'float', 'symmetric': True, "
     "'strategy': 'tensor', 'dynamic': False}: only 8-bit symmetric float (FP8) weights can be dequantized"),
    ({**ct_qc(), "kv_cache_scheme": {"num_bits": 8}}, {}, "quantization_config.kv_cache_scheme is set; a quantized "
     "KV cache cannot be dequantized by this tool"),
    ({**ct_qc(), "config_groups": {**ct_qc()["config_groups"], "group_1": {}}}, {},
     "quantization_config.config_groups holds 2 groups; only one FP8 group can be dequantized"),
    (ct_qc(), {"m.weight_scale": torch.ones(2, dtype=torch.bfloat16)},
     "scale m.weight_scale has shape [2], but weight m.weight [96, 160] in 96x160 blocks needs [1, 1]"),
    (ct_qc("channel"), {"m.weight_scale": torch.ones(96, 1)}, None),
    (ct_qc("group", "mxfp8-quantized", group_size=32), {"m.weight_scale": torch.ones(96, 5)},
     "scale m.weight_scale is F32; expected one of U8"),
    (ct_qc(), {"m.weight_zero_point": torch.zeros(1)}, "m.weight_zero_point: asymmetric weights (a zero point) cannot "
     "be dequantized"),
])
def test_refuses_compressed_tensors_it_cannot_read(tmp_path, qc, tensors, message):
    gen = torch.Generator().manual_seed(3)
    base = {"m.weight": (torch.randn(96, 160, generator=gen) * 60).to(torch.float8_e4m3fn),
            "m.weight_scale": torch.ones(1, dtype=torch.bfloat16)}
    src = fp8_checkpoint(tmp_path / "ct", {**base, **tensors}, qc)
    if message is None:  # an F32 channel scale reads
        assert tensors_of(dequantized(src, tmp_path / "o"))["m.weight"].dtype == torch.bfloat16
        return
    line = refused(src, tmp_path)
    assert line.startswith(f"convert-fp8: error: {src}/") and line.endswith(message), line
