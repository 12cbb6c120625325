"""Model families as users bring them: tiny random models saved by transformers itself, converted with defaults,
loaded back by transformers' own loader, and compared byte for byte with transformers' own quantizer."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from converter import arch
from converter.configs import FP8Scheme
from converter.plan import make_plan
from converter.source import open_source

from .conftest import read_json, run_cli
from .model_zoo import FAMILIES, FUSED, PER_EXPERT, save_family
from .test_convert import load_all, raw
from .test_quantize import transformers_quantize

DENSE = [t for t in FAMILIES if t not in PER_EXPERT + FUSED and t != "gpt2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test asks transformers afresh (a cached answer would hide what the test is about)."""
    monkeypatch.setenv(arch.CACHE_ENV, str(tmp_path / "cache"))


def convert_and_load(model_type: str, tmp_path, *args):
    """Convert a tiny `model_type` with defaults; returns (source tensors, output tensors, cosine of the logits
    of transformers' CPU load of the output against the BF16 source, loading info)."""
    from transformers import AutoModelForCausalLM

    src = save_family(model_type, tmp_path / model_type)
    dst = tmp_path / f"{model_type}-fp8"
    result = run_cli("--src", src, "--dst", dst, *args)
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    bf16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    fp8, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16, output_loading_info=True)
    with torch.no_grad():
        a, b = bf16(ids).logits.float().flatten(), fp8(ids).logits.float().flatten()
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return load_all(src)[1], load_all(dst)[1], cosine, info, dst


def assert_fp8_bytes_are_transformers(s: dict, o: dict, block: int = 64) -> list[str]:
    """Every FP8 weight of the output and its scales equal transformers' `Fp8Quantize` of the source weight;
    every other tensor is the source's, byte for byte. Returns the FP8 weight names."""
    fp8 = sorted(n for n, t in o.items() if t.dtype == torch.float8_e4m3fn)
    for name in fp8:
        ref = transformers_quantize(name, s[name], block)
        scale = name + "_scale_inv"
        assert raw(o[name]) == raw(ref[name]) and raw(o[scale]) == raw(ref[scale]), name
    for name in set(s) - set(fp8):
        assert raw(o[name]) == raw(s[name]), name
    return fp8


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [*PER_EXPERT, *DENSE])
def test_family_converts_with_defaults_loads_and_matches_transformers(model_type, tmp_path):
    s, o, cosine, info, _ = convert_and_load(model_type, tmp_path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert cosine >= 0.98, cosine
    fp8 = assert_fp8_bytes_are_transformers(s, o)
    experts = [n for n in fp8 if ".experts." in n]
    assert bool(experts) == (model_type in PER_EXPERT)
    routers = [n for n in s if n.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight"))]
    assert all(o[n].dtype == torch.bfloat16 for n in routers) and bool(routers) == (model_type in PER_EXPERT)


def test_per_expert_moe_default_run(tmp_path):
    """The default suite's per-expert family: Qwen3-MoE, as the slow test above checks every family."""
    s, o, cosine, info, dst = convert_and_load("qwen3_moe", tmp_path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and cosine >= 0.98
    fp8 = assert_fp8_bytes_are_transformers(s, o)
    assert len([n for n in fp8 if ".experts." in n]) == 24  # 2 layers x 4 experts x 3 projections
    qc = read_json(dst / "config.json")["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.vision_tower", "lm_head", "model.layers.0.mlp.gate",
                                            "model.layers.1.mlp.gate"]
    # validate finds each per-expert FP8 weight in the fused experts tensor the loader made of it
    result = run_cli("validate", "--dst", dst, "--device", "cpu", "--max-new-tokens", "2",
                     "--report", tmp_path / "r.json")
    assert "[ok] fp8 path: 32 FP8 modules: all dequantized from their FP8 blocks and scales" in result.output


def test_fused_experts_loaded_equal_transformers_quantizing_the_fused_tensor(tmp_path):
    """What the loader makes of the per-expert FP8 tensors (merged into `experts.gate_up_proj` and dequantized on
    the CPU) equals transformers quantizing the fused BF16 tensor and dequantizing it: the same blocks."""
    from transformers import AutoModelForCausalLM

    _, o, _, _, dst = convert_and_load("qwen3_moe", tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3_moe", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    for layer in range(2):
        for param in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{param}"
            fused = getattr(bf16.model.layers[layer].mlp.experts, param).detach()
            ref = transformers_quantize(name, fused, 64)
            fp8, scale = ref[name].float(), ref[name + "_scale_inv"]
            expected = (fp8 * scale.repeat_interleave(64, -2).repeat_interleave(64, -1)).to(torch.bfloat16)
            got = getattr(loaded.model.layers[layer].mlp.experts, param).detach()
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), name
            # and the stored per-expert bytes are the fused tensor's, expert by expert
            parts = ("gate_proj", "up_proj") if param == "gate_up_proj" else ("down_proj",)
            for e in range(4):
                ours = torch.cat([o[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"] for p in parts])
                assert raw(ours) == raw(ref[name][e]), (name, e)


def transformers_fp8_save(src, dst, block: int = 64):
    """transformers' own recipe: `from_pretrained(..., FineGrainedFP8Config)` then `save_pretrained`. Its environment
    check asks for a GPU, which its quantizer's math does not need: skipped, the quantizer runs on the CPU."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    check = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        qc = FineGrainedFP8Config(weight_block_size=(block, block), modules_to_not_convert=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, dtype=torch.bfloat16)
        model.save_pretrained(dst, max_shard_size="200KB")
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = check
    return dst


def test_granitemoe_fused_experts_are_byte_identical_to_transformers_own_save(tmp_path):
    """granitemoe stores its experts fused under names transformers renames on load; transformers saves the FP8
    tensors under the stored names and their scales under the loaded ones. The default conversion writes exactly
    that: same names, dtypes and bytes; the FP8 loader places every tensor; verify, dequantize and re-quantizing
    it read the renamed scales."""
    src = save_family("granitemoe", tmp_path / "granitemoe")
    dst = tmp_path / "ours"
    result = run_cli("--src", src, "--dst", dst)
    assert result.exit_code == 0, result.output
    theirs = transformers_fp8_save(src, tmp_path / "theirs")
    _, o = load_all(dst)
    _, t = load_all(theirs)
    assert sorted(o) == sorted(t)
    assert [n for n in o if o[n].dtype != t[n].dtype or raw(o[n]) != raw(t[n])] == []
    experts = "model.layers.0.block_sparse_moe"
    assert o[f"{experts}.input_linear.weight"].dtype == torch.float8_e4m3fn
    assert tuple(o[f"{experts}.experts.gate_up_proj_scale_inv"].shape) == (4, 8, 2)
    assert o[f"{experts}.router.layer.weight"].dtype == torch.bfloat16
    found = arch.placement(read_json(dst / "config.json"), list(o))
    assert found.unset == () and {v[0] for v in found.tensors.values()} == {arch.FP8, arch.SCALE, arch.HIGH}
    assert found.tensors[f"{experts}.experts.gate_up_proj_scale_inv"][0] == arch.SCALE
    checked = run_cli("verify", "--src", src, "--dst", dst)
    assert checked.exit_code == 0 and "verify: OK" in checked.output, checked.output
    for name, folder in (("ours", dst), ("theirs", theirs)):
        assert run_cli("dequantize", "--src", folder, "--dst", tmp_path / f"{name}-bf16").exit_code == 0
    assert load_all(tmp_path / "ours-bf16")[1].keys() == load_all(src)[1].keys()
    a, b = load_all(tmp_path / "ours-bf16")[1], load_all(tmp_path / "theirs-bf16")[1]
    assert [n for n in a if raw(a[n]) != raw(b[n])] == []
    again = run_cli("--src", dst, "--dst", tmp_path / "128", "--block-size", "128")
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("model_type, plans", [
    ("llama", [True]),  # the names give transformers' plan: written once, while transformers answers
    ("granitemoe", [True, False]),  # fused experts only transformers finds: written again with its plan
])
def test_a_first_conversion_writes_while_transformers_answers_and_again_if_the_plan_was_not_its(
        model_type, plans, tmp_path, monkeypatch):
    """`plans`: for each start of the run, whether its plan was provisional (made before transformers' answer)."""
    from converter import convert

    from .conftest import tree_digest

    src = save_family(model_type, tmp_path / model_type)
    provisional, real = [], convert._prepare
    monkeypatch.setattr(convert, "_prepare", lambda *a, **k: (lambda r: provisional.append(r[3]) or r)(real(*a, **k)))
    first = run_cli("--src", src, "--dst", tmp_path / "first")
    assert first.exit_code == 0 and provisional == plans, first.output
    provisional.clear()
    later = run_cli("--src", src, "--dst", tmp_path / "later")  # the answer cached: the plan is final at once
    assert later.exit_code == 0 and provisional == [False], later.output
    assert tree_digest(tmp_path / "first") == tree_digest(tmp_path / "later")
    said = lambda result, name: [line.replace(str(tmp_path / name), "DST") for line in result.output.splitlines()
                                 if "peak memory" not in line]  # noqa: E731 - the same notes, the same lines
    assert said(first, "first") == said(later, "later")


def test_gpt2_conv1d_is_refused_in_one_line(tmp_path):
    src = save_family("gpt2", tmp_path / "gpt2")
    result = run_cli("--src", src, "--dst", tmp_path / "o")
    assert result.exit_code == 1
    assert result.output == ("convert-fp8: error: nothing to quantize: all 8 Linear-like module(s) stay in the "
                             "source dtype (transformers keeps it in high precision (Conv1D): 8)\n")
    assert not (tmp_path / "o").exists()


def _deepseek(tmp_path):
    return save_family("deepseek_v3", tmp_path / "ds")


ROUTER = "model.layers.1.mlp.gate"


def test_deepseek_router_that_tiles_stays_bf16_with_transformers(tmp_path):
    src = _deepseek(tmp_path)
    result = run_cli("--src", src, "--dst", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "     1  copied, MoE router" in result.output
    assert "   192  FP8 weight, expert Linear (per-expert, fused at load)" in result.output
    assert "     3  FP8 weight, shared expert Linear" in result.output
    assert f"modules_to_not_convert: ['model.vision_tower', 'lm_head', '{ROUTER}']" in result.output
    s = open_source(src)
    assert s.tensors[ROUTER + ".weight"].shape == (64, 128)  # tiles by 64: only the name rule keeps it


def test_deepseek_router_stays_bf16_without_transformers(tmp_path, monkeypatch):
    src = _deepseek(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails, as when not installed
    result = run_cli("--src", src, "--dst", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "note: architecture check skipped: transformers is not installed" in result.output
    assert "     1  copied, MoE router" in result.output
    plan = make_plan(open_source(src), FP8Scheme(64), ("lm_head",), 5 * 10**9)
    assert plan.kept_linears[ROUTER] == "MoE router"


def test_unknown_model_type_converts_by_name_rules_with_one_note(tmp_path):
    src = _deepseek(tmp_path)
    config = read_json(src / "config.json")
    config.update(model_type="acme_moe", architectures=["AcmeMoeForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "o"
    result = run_cli("--src", src, "--dst", dst)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ["note: architecture check skipped: transformers 5.24.0 does not know AcmeMoeForCausalLM; "
                     "tensors are chosen by their names, dtypes and shapes alone"]
    _, o = load_all(dst)
    assert o[ROUTER + ".weight"].dtype == torch.bfloat16
    assert o["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert ROUTER in read_json(dst / "config.json")["quantization_config"]["modules_to_not_convert"]
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "placement").glob("*.json")]
    assert {"unknown": "transformers 5.24.0 does not know AcmeMoeForCausalLM"} in cached  # not asked again


def test_experts_that_do_not_tile_are_kept_together_and_excluded_as_one_module(tmp_path):
    src = save_family("qwen3_moe", tmp_path / "q", moe_intermediate_size=96)  # 96 rows: no 64 tiling
    dst = tmp_path / "o"
    result = run_cli("--src", src, "--dst", dst)
    assert result.exit_code == 0, result.output
    qc = read_json(dst / "config.json")["quantization_config"]
    assert {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"} <= set(qc["modules_to_not_convert"])
    _, o = load_all(dst)
    assert not any(t.dtype == torch.float8_e4m3fn for n, t in o.items() if ".experts." in n)
    assert o["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert run_cli("verify", "--dst", dst, "-q").exit_code == 0


@pytest.mark.parametrize("preset, model_type, kept", [
    ("deepseek-v3", "deepseek_v3", ["lm_head", "mlp.gate"]),
    ("qwen3-moe", "qwen3_moe", ["lm_head", "mlp.gate"]),
    ("glm4-moe", "glm4_moe", ["lm_head", "mlp.gate"]),
    ("mixtral", "mixtral", ["lm_head", "block_sparse_moe.gate"]),
])
def test_moe_presets_on_their_structure(preset, model_type, kept, tmp_path):
    overrides = {"hidden_size": 256, "intermediate_size": 256}
    if model_type == "deepseek_v3":  # 128x128 blocks: real MLA widths tile by 128 except kv_a_proj_with_mqa
        overrides.update(q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128, moe_intermediate_size=128, n_routed_experts=8)
    elif model_type in ("qwen3_moe", "glm4_moe"):
        overrides.update(head_dim=128, moe_intermediate_size=128)
    else:
        overrides.update(num_attention_heads=2, num_key_value_heads=2)
    src = save_family(model_type, tmp_path / model_type, **overrides)
    dst = tmp_path / "o"
    result = run_cli("--src", src, "--dst", dst, "--config", preset)
    assert result.exit_code == 0, result.output
    assert "note: preset" not in result.output  # meant for this architecture
    qc = read_json(dst / "config.json")["quantization_config"]
    assert qc["weight_block_size"] == [128, 128]
    s, o = load_all(src)[1], load_all(dst)[1]
    fp8 = assert_fp8_bytes_are_transformers(s, o, 128)
    assert any(".experts.0." in n for n in fp8)
    if model_type == "deepseek_v3":
        assert qc["modules_to_not_convert"] == kept + ["model.layers.0.self_attn.kv_a_proj_with_mqa",
                                                       "model.layers.1.self_attn.kv_a_proj_with_mqa"]
        assert s["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (192, 256)  # 128 + 64 rows
    else:
        assert qc["modules_to_not_convert"] == kept


def test_a_model_transformers_cannot_place_falls_back_to_the_name_rules(tmp_path, monkeypatch):
    src = save_family("qwen3_moe", tmp_path / "q")

    def fails(*args):
        raise RuntimeError("meta tensors went astray\nsecond line")

    monkeypatch.setattr(arch, "_place", fails)
    result = run_cli("--src", src, "--dst", tmp_path / "o")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ["note: architecture check skipped: transformers cannot place the tensors of Qwen3MoeForCausalLM "
                     "(RuntimeError: meta tensors went astray); tensors are chosen by their names, dtypes and "
                     "shapes alone"]
    _, o = load_all(tmp_path / "o")
    assert o["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert o["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_layers_the_loader_drops_are_quantized_by_name(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer past num_hidden_layers, which transformers
    drops as unexpected and servers load: its Linears are quantized by the name rules, its router kept."""
    src = _deepseek(tmp_path)
    config = read_json(src / "config.json")
    config["num_hidden_layers"] = 1  # layer 1 is now the extra layer
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "o"
    result = run_cli("--src", src, "--dst", dst)
    assert result.exit_code == 0, result.output
    _, o = load_all(dst)
    assert o["model.layers.1.mlp.experts.7.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert o["model.layers.1.self_attn.q_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert o[ROUTER + ".weight"].dtype == torch.bfloat16
