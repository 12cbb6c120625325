"""The Gemma 4 family and other block sizes: the MoE sibling's 3-D expert tensors, 128x128 blocks, presets."""

import pytest
import torch

from converter.demo import build_checkpoint, gemma4_moe_config, gemma4_small_config

from .conftest import read_json, run_cli, tiny_llama
from .test_convert import load_all, raw
from .test_quantize import transformers_quantize


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The MoE checkpoint converted with defaults (its routers, 4 wide, do not tile and stay BF16 anyway)."""
    src = build_checkpoint(tmp_path_factory.mktemp("moe") / "gemma-4-moe", gemma4_moe_config())
    dst = tmp_path_factory.mktemp("moe-out") / "fp8"
    result = run_cli("--src", src, "--dst", dst)
    assert result.exit_code == 0, result.output
    return src, dst


def test_moe_experts_match_transformers_bytes_and_names(moe):
    src, dst = moe
    _, s = load_all(src)
    _, o = load_all(dst)
    experts = [n for n in s if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4
    for name in experts:
        ref = transformers_quantize(name, s[name], 64)  # names too: `<tensor>_scale_inv`
        assert set(ref) == {name, name + "_scale_inv"}
        assert o[name].dtype == torch.float8_e4m3fn and raw(o[name]) == raw(ref[name]), name
        assert o[name + "_scale_inv"].shape == (4, s[name].shape[1] // 64, s[name].shape[2] // 64)
        assert raw(o[name + "_scale_inv"]) == raw(ref[name + "_scale_inv"]), name
    linears = [n for n, t in o.items() if t.dtype == torch.float8_e4m3fn and n.endswith(".weight")]
    for name in linears:
        ref = transformers_quantize(name, s[name], 64)
        assert raw(o[name]) == raw(ref[name]) and raw(o[name[:-len(".weight")] + ".weight_scale_inv"]) == raw(
            ref[name[:-len(".weight")] + ".weight_scale_inv"])
    fp8 = set(linears) | set(experts)
    for name in set(s) - fp8:  # routers, norms, embeddings, the vision tower: unchanged
        assert raw(o[name]) == raw(s[name]), name
    assert set(o) == set(s) | {n + "_scale_inv" for n in experts} | {n[:-7] + ".weight_scale_inv" for n in linears}


def test_verify_names_a_bad_expert_scale(moe, tmp_path):
    import shutil

    from .test_verify import patch

    src, dst = moe
    dst = shutil.copytree(dst, tmp_path / "dst")
    name = "model.language_model.layers.1.experts.down_proj_scale_inv"
    patch(dst, name, lambda t: t[2, 1, 0].fill_(float("inf")))  # expert 2, tile row 1 of its 3
    result = run_cli("verify", "--dst", dst, "-q")
    assert result.exit_code == 1
    assert f"tensor {name}" in result.output and "1 scale(s) not finite and positive, first at tile (7, 0): inf" in result.output


def test_moe_preset_config_and_routers(moe, tmp_path):
    src, _ = moe
    dst = tmp_path / "preset"
    result = run_cli("--src", src, "--dst", dst, "--config", "gemma-4-26b-a4b-it")
    assert result.exit_code == 0, result.output
    qc = read_json(dst / "config.json")["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.vision_tower", "lm_head", "router.proj"]
    routers = [f"model.language_model.layers.{i}.router.proj" for i in range(2)]
    assert set(routers) <= set(qc["ignored_layers"])
    index = read_json(dst / "model.safetensors.index.json")["weight_map"]
    assert "model.language_model.layers.0.router.scale" in index  # kept under its own name


def test_moe_validate_on_cpu_names_the_experts_transformers_leaves_unscaled(moe, tmp_path):
    """transformers 5.24 on the CPU dequantizes Linears but not these experts: it loads their E4M3 bytes as
    BF16 numbers and reports the scales as unexpected keys. validate says so instead of passing."""
    src, dst = moe
    result = run_cli("validate", "--dst", dst, "--src", src, "--device", "cpu", "--max-new-tokens", "2",
                     "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    assert ("[FAIL] fp8 path: 4 of 18 FP8 modules wrong, first model.language_model.layers.0.experts.gate_up_proj: "
            "loaded values differ from its dequantized FP8 blocks") in result.output


def test_block_128_on_the_moe_leaves_nothing_to_quantize_and_is_refused(moe, tmp_path):
    src, _ = moe  # no Linear nor expert tensor of the tiny MoE tiles by 128
    result = run_cli("--src", src, "--dst", tmp_path / "o", "--block-size", "128")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "nothing to quantize: all 26 Linear-like module(s)" in result.output
    assert "(excluded by 'model.vision_tower': 8; shape 256x192 does not tile by 128: 5; " in result.output
    assert not (tmp_path / "o").exists()


def test_block_128_on_the_31b_structure_matches_transformers(gemma_src, tmp_path):
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "o", "--block-size", "128")
    assert result.exit_code == 0, result.output
    _, s = load_all(gemma_src)
    _, o = load_all(tmp_path / "o")
    fp8 = [n for n, t in o.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 22  # k and v of sliding layers (64 rows) and embed_vision (64 columns) stay BF16
    for name in fp8:
        ref = transformers_quantize(name, s[name], 128)
        scale = name[: -len(".weight")] + ".weight_scale_inv"
        assert raw(o[name]) == raw(ref[name]) and raw(o[scale]) == raw(ref[scale]), name
    qc = read_json(tmp_path / "o" / "config.json")["quantization_config"]
    assert "model.language_model.layers.0.self_attn.k_proj" in qc["modules_to_not_convert"]


def test_non_square_blocks_are_refused(gemma_src, tmp_path):
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "o", "--block-size", "64x128")
    assert result.exit_code == 2
    assert "non-square blocks are refused" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("preset", ["gemma-4-e4b-it", "gemma-4-e2b-it"])
def test_small_gemma_preset_with_per_layer_embeddings_and_audio(preset, tmp_path):
    src = build_checkpoint(tmp_path / "small", gemma4_small_config())
    result = run_cli("--src", src, "--dst", tmp_path / "o", "--config", preset)
    assert result.exit_code == 0, result.output  # the transformers cross-check agreed
    _, o = load_all(tmp_path / "o")
    fp8 = {n for n, t in o.items() if t.dtype == torch.float8_e4m3fn}
    assert "model.language_model.per_layer_model_projection.weight" in fp8
    assert not any("audio_tower" in n or "vision_tower" in n for n in fp8)
    assert o["model.language_model.embed_tokens_per_layer.weight"].dtype == torch.bfloat16
    from transformers import Gemma4ForConditionalGeneration

    _, info = Gemma4ForConditionalGeneration.from_pretrained(tmp_path / "o", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_llama_preset(tmp_path):
    src = tiny_llama(tmp_path / "llama")
    result = run_cli("--src", src, "--dst", tmp_path / "o", "--config", "llama")
    assert result.exit_code == 0, result.output
    assert "note: preset" not in result.output  # meant for this architecture
    qc = read_json(tmp_path / "o" / "config.json")["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head"] and qc["ignored_layers"] == ["lm_head"]  # untied here


def test_presets_list():
    from converter.presets import available_presets

    assert available_presets() == ["deepseek-v3", "default", "gemma-4-26b-a4b-it", "gemma-4-31b-it",
                                   "gemma-4-e2b-it", "gemma-4-e4b-it", "glm4-moe", "llama", "mixtral", "qwen3-moe"]
