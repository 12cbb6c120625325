"""Output dialects against their reference implementations, byte for byte: transformers' `Fp8Quantize` with
UE8M0 scales, compressed-tensors' FP8 block and channel math, and (slow) llm-compressor's `model_free_ptq` run in
a venv of its own, on Llama, BERT and Gemma 4 checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.demo import build_checkpoint, gemma4_moe_config
from converter.dialects.compressed_tensors import match_name, quantize_ct, unstored_entry
from converter.dialects.transformers_fp8 import quantize_tiles
from converter.verify import verify
from tests.conftest import run_cli, tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parent.parent
LLMC_VENV = REPO / ".venv-llmc"
LLMC_PYTHON = LLMC_VENV / "bin" / "python"
# --scheme -> llm-compressor's preset name
CT_SCHEMES = [("fp8-block", "FP8_BLOCK"), ("fp8-dynamic", "FP8_DYNAMIC"), ("mxfp8", "MXFP8"), ("mxfp8a16", "MXFP8A16")]


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def header_dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        raw = shard.read_bytes()
        header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def convert(src: Path, dst: Path, *args) -> Path:
    result = run_cli("--src", src, "--dst", dst, "-q", *args)
    assert result.exit_code == 0, result.output
    return dst


def load_with_info(path: Path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    return model.eval(), {k: v for k, v in info.items() if v}


def assert_loads_our_bytes_with_close_logits(dst, src, ours: dict):
    """transformers (with compressed-tensors) loads `dst` with no missing or unexpected key, keeps the compressed
    weights and scales as stored (it runs compressed-tensors' quantize-dequantize, activations included, at run
    time), and its logits are within cosine 0.99 of the BF16 source's. Returns (those logits, the source's)."""
    import transformers

    model, info = load_with_info(dst)
    assert info == {}
    up = model.model.layers[1].mlp.up_proj
    assert as_bytes(up.weight) == as_bytes(ours["model.layers.1.mlp.up_proj.weight"])
    assert as_bytes(up.weight_scale) == as_bytes(ours["model.layers.1.mlp.up_proj.weight_scale"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    return got, want


def tricky_weight(dtype, rows=320, cols=448, seed=1):
    """Random values with an all-zero tile, an outlier, a float32-subnormal tile and values a few ulps above
    powers of two (where torch's log2 rounds to a whole number)."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.02
    w[:64, :64] = 0
    w[70, 300] = 250.0
    w[64:128, 128:192] = 2.0 ** -10 * (1 + 2.0 ** -22)
    if dtype != torch.float16:
        w[128:192, 64:128] = 1e-39  # float32-subnormal (BF16 has the same range)
        w[128, 64] = -3e-39
        w[192:256, :64] *= 2.0 ** 100  # products far above E4M3's range: clamped
    return w.to(dtype)


# ---- transformers fp8, UE8M0 scales --------------------------------------------------------------------------

def transformers_ue8m0(name: str, weight: torch.Tensor, block: int = 64) -> dict:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=(block, block), scale_fmt="ue8m0")

    return Fp8Quantize(Quantizer()).convert({name: weight})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ue8m0_formula_bytes_match_transformers(dtype):
    w = tricky_weight(dtype)
    fp8, inv = quantize_tiles(w, 64, "ue8m0")
    ref = transformers_ue8m0("m.weight", w)
    assert inv.dtype == torch.float8_e8m0fnu and ref["m.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    assert as_bytes(fp8) == as_bytes(ref["m.weight"])
    assert as_bytes(inv) == as_bytes(ref["m.weight_scale_inv"])
    assert inv.view(torch.uint8)[0, 0] == 127  # all-zero tile: inverse scale 1.0 = 2**0
    # 2**-10 (1 + 2**-22) rounds up in exact arithmetic but torch's float32 log2 gives exactly -10: 2**-10 * 448
    # is the tile's amax times... here the tile's inverse scale is amax/448 ~ 2**-18.8 -> 2**-18
    assert inv.view(torch.uint8)[1, 2] == 127 - 18


def test_ue8m0_conversion_bytes_config_verify_and_load(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    dst = convert(src, tmp_path / "out", "--scale-fmt", "ue8m0")
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [64, 64] and qc["quant_method"] == "fp8"
    ours, source, dtypes = tensors_of(dst), tensors_of(src), header_dtypes(dst)
    fp8_names = [n for n, t in ours.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8_names) == 14  # 7 Linears x 2 layers; lm_head excluded by the preset
    for name in fp8_names:
        ref = transformers_ue8m0(name, source[name])
        assert dtypes[name + "_scale_inv"] == "F8_E8M0"
        assert as_bytes(ours[name]) == as_bytes(ref[name]), name
        assert as_bytes(ours[name + "_scale_inv"]) == as_bytes(ref[name + "_scale_inv"]), name
    report = verify(dst, src)
    assert report.ok, [str(p) for p in report.problems]
    assert report.fp8_tensors == 14
    model, info = load_with_info(dst)
    assert info == {}
    # on the CPU transformers dequantizes on load: each block times its power of two
    q, inv = ours["model.layers.0.mlp.up_proj.weight"], ours["model.layers.0.mlp.up_proj.weight_scale_inv"]
    want = q.float() * inv.float().repeat_interleave(64, 0).repeat_interleave(64, 1)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, want.to(torch.bfloat16))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_ue8m0_scale_changed_is_found(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    dst = convert(src, tmp_path / "out", "--scale-fmt", "ue8m0", "--max-shard-size", "10GB")
    shard = dst / "model-00001-of-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    start = 8 + int.from_bytes(raw[:8], "little") + header[name]["data_offsets"][0]
    raw[start] += 1  # twice the inverse scale
    shard.write_bytes(bytes(raw))
    messages = [str(p) for p in verify(dst, src).problems]
    assert f"tensor {name} in {shard.name}: weight_scale_inv differs from the re-quantized source, first at " \
           "tile (0, 0)" in messages


# ---- compressed-tensors --------------------------------------------------------------------------------------

def compressed_tensors_reference(weight: torch.Tensor, scheme: str, block: int = 128):
    """compressed-tensors' own math: min/max -> `calculate_qparams` -> `quantize`, as `model_free_ptq` runs them
    for a static-weight scheme."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = preset_name_to_scheme(scheme, ["Linear"]).weights
    rows, cols = weight.shape
    if scheme == "FP8_BLOCK":
        args.block_structure = [block, block]
        pr = -(-rows // block) * block
        padded = torch.zeros(pr, cols, dtype=weight.dtype)
        padded[:rows] = weight
        tiles = padded.reshape(pr // block, block, cols // block, block).transpose(1, 2).flatten(-2)
        lo, hi = tiles.amin(dim=-1), tiles.amax(dim=-1)
    else:
        lo, hi = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    scale, _ = calculate_qparams(lo, hi, args)
    # a symmetric scheme's module has no weight_zero_point, so the compressor quantizes without one (adding its
    # zeros would turn -0.0 into +0.0)
    return quantize(weight, scale, None, args, dtype=torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme,block", [("FP8_BLOCK", 128), ("FP8_BLOCK", 64), ("FP8_DYNAMIC", None)])
def test_compressed_tensors_formula_bytes(dtype, scheme, block):
    w = tricky_weight(dtype, rows=200, cols=384)  # 200 rows: a partial block row at the end
    fp8, scale = quantize_ct(w, block)
    ref_fp8, ref_scale = compressed_tensors_reference(w, scheme, block or 128)
    assert scale.dtype == dtype and ref_scale.dtype == dtype
    assert scale.shape == ((-(-200 // block), 384 // block) if block else (200, 1))
    assert as_bytes(fp8) == as_bytes(ref_fp8)
    assert as_bytes(scale) == as_bytes(ref_scale)


def test_match_name_is_exact_or_anchored_regex():
    assert match_name("lm_head", "lm_head") and not match_name("model.lm_head", "lm_head")
    assert not match_name("model.layers.1.mlp", "model.layers.1")  # no prefixes, unlike modules_to_not_convert
    assert match_name("model.layers.1.mlp.up_proj", "re:.*mlp") and not match_name("x.mlp", "re:mlp")
    tower = unstored_entry("model.vision_tower")  # an excluded path the checkpoint does not store
    assert match_name("model.vision_tower.encoder.layers.0.mlp.up_proj", tower)
    assert not match_name("model.vision_tower_2.proj", tower)
    assert unstored_entry("lm_head") == "lm_head"


def test_compressed_tensors_block_config_load_and_logits(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=200)  # down_proj 128x200: columns do not tile
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors")
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    down = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # the preset's model.vision_tower is not stored here: ignored with all it holds, in case the loader builds it
    assert qc["ignore"] == [*down, "lm_head", r"re:model\.vision_tower($|\.)", "model.embed_tokens"]
    group = qc["config_groups"]["FP8_BLOCK"]
    assert group["weights"]["block_structure"] == [128, 128] and group["input_activations"]["group_size"] == 128
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "float-quantized",
                                                                            "compressed")
    ours = tensors_of(dst)
    assert ours["model.layers.0.mlp.gate_proj.weight_scale"].shape == (2, 1)  # 200 rows: a partial block
    assert ours["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert verify(dst, src).ok
    got, want = assert_loads_our_bytes_with_close_logits(dst, src, ours)
    assert not torch.equal(got, want)


def test_compressed_tensors_tied_head_is_ignored_or_refused(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256, tie=True)
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors", "--scheme", "fp8-dynamic")
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == [r"re:model\.vision_tower($|\.)", "lm_head", "model.embed_tokens"]
    assert qc["config_groups"]["FP8_DYNAMIC"]["weights"]["strategy"] == "channel"
    model, info = load_with_info(dst)
    assert info == {}
    preset = tmp_path / "bare.json"
    preset.write_text(json.dumps({"description": "no exclusions", "modules_to_not_convert": []}))
    result = run_cli("--src", src, "--dst", tmp_path / "bad", "--format", "compressed-tensors", "--config", preset)
    assert result.exit_code == 1
    assert "transformers would load 1 module(s) as FP8 that stay unquantized here, first 'lm_head'" in result.output


def test_validate_finds_a_tied_head_left_out_of_ignore(tmp_path):
    from converter.validate import validate

    src = tiny_llama(tmp_path / "llama", intermediate_size=256, tie=True)
    preset = tmp_path / "bare.json"
    preset.write_text(json.dumps({"description": "no exclusions", "modules_to_not_convert": []}))
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors", "--config", preset, "--no-arch-check")
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"] == ["model.embed_tokens"]
    report = validate(dst, src, device="cpu")
    load = next(c for c in report.checks if c.name == "load")
    assert not load.ok and "1 missing keys, first lm_head.weight_scale" in load.detail
    assert not report.ok


def test_compressed_tensors_refuses_fused_experts(tmp_path):
    src = build_checkpoint(tmp_path / "moe", gemma4_moe_config())
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--format", "compressed-tensors", "--block-size", "64")
    assert result.exit_code == 1
    assert "model.language_model.layers.0.experts.gate_up_proj: fused expert tensors cannot be written as " \
           "compressed-tensors" in result.output
    assert "--exclude 'model.language_model.layers.\\d+.experts' keeps them in BF16" in result.output
    # so excluded, the experts stay fused in BF16 and transformers loads every weight (llm-compressor's own
    # output of this model loads with the experts missing: it splits them into per-expert Linears)
    dst = convert(src, tmp_path / "ok", "--format", "compressed-tensors", "--block-size", "64", "--exclude",
                  r"model.language_model.layers.\d+.experts")
    assert verify(dst, src).ok
    import transformers

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.bfloat16,
                                                                          output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.model.language_model.layers[0].experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("args,message", [
    (("--scheme", "fp8-dynamic"), "--scheme fp8-dynamic is a compressed-tensors scheme: add --format compressed-tensors"),
    (("--format", "compressed-tensors", "--scale-fmt", "ue8m0"), "--scale-fmt ue8m0 is for --format fp8"),
    (("--format", "compressed-tensors", "--scheme", "fp8-dynamic", "--block-size", "64"),
     "--block-size does not apply to --scheme fp8-dynamic"),
])
def test_contradictory_dialect_options(tmp_path, args, message):
    result = run_cli("--src", tmp_path, "--dst", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output


def test_compressed_tensors_scale_changed_is_found(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors", "--max-shard-size", "10GB")
    from safetensors.torch import load_file, save_file

    shard = dst / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] *= 2
    save_file(tensors, shard, metadata={"format": "pt"})
    messages = [str(p) for p in verify(dst, src).problems]
    assert any("tensor model.layers.1.self_attn.o_proj.weight_scale" in m and "weight_scale differs from the "
               "re-quantized source, first at tile (0, 0)" in m for m in messages), messages


# ---- llm-compressor's model_free_ptq, in its own venv (slow) ---------------------------------------------------

LLMC_SCRIPT = """
import json, sys
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
from llmcompressor import model_free_ptq
src, dst, scheme, block, ignore = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
if block != 128:
    custom = preset_name_to_scheme(scheme, ["Linear"])
    custom.weights.block_structure = [block, block]
    custom.input_activations.group_size = block
    scheme = custom
model_free_ptq(src, dst, scheme=scheme, ignore=ignore, device="cpu")
"""


@pytest.fixture(scope="session")
def llmc_python() -> Path:
    """llm-compressor 0.14.0.1 (transformers 5.17, compressed-tensors 0.19) in `.venv-llmc`, built when absent:
    torch 2.13.0 (the local CPU wheel) first, everything else constrained to it."""
    if not LLMC_PYTHON.exists():
        constraints = LLMC_VENV.parent / ".venv-llmc-constraints.txt"
        try:
            subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True, capture_output=True)
            constraints.write_text("torch==2.13.0\n")
            pip = [str(LLMC_PYTHON), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "torch==2.13.0"], check=True, capture_output=True, timeout=900)
            subprocess.run([*pip, "-c", str(constraints), "llmcompressor==0.14.0.1"], check=True,
                           capture_output=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"llm-compressor's venv could not be built in {LLMC_VENV}: {exc}")
        finally:
            constraints.unlink(missing_ok=True)
    return LLMC_PYTHON


def llm_compressor(python: Path, src: Path, dst: Path, scheme: str, block: int, ignore: list[str]) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([str(python), "-c", LLMC_SCRIPT, str(src), str(dst), scheme, str(block),
                             json.dumps(ignore)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dst


def assert_same_as_llm_compressor(python: Path, src: Path, tmp_path: Path, scheme: str, block: int, *args):
    ours = convert(src, tmp_path / "ours", "--format", "compressed-tensors", *args)
    qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    theirs = llm_compressor(python, src, tmp_path / "theirs", scheme, block, qc["ignore"])
    a, b = tensors_of(ours), tensors_of(theirs)
    assert sorted(a) == sorted(b)
    differ = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or as_bytes(a[n]) != as_bytes(b[n])]
    assert differ == []
    their_qc = json.loads((theirs / "config.json").read_text())["quantization_config"]
    qc.pop("version"), their_qc.pop("version")
    assert qc == their_qc
    return a


@pytest.mark.slow
@pytest.mark.parametrize("args,scheme,block,fp8", [((), "FP8_BLOCK", 128, 12),
                                                   (("--block-size", "64"), "FP8_BLOCK", 64, 14),
                                                   (("--scheme", "fp8-dynamic"), "FP8_DYNAMIC", 128, 14)])
def test_llama_matches_llm_compressor(llmc_python, tmp_path, args, scheme, block, fp8):
    # 64x128 k_proj and 192x128 gate/up: partial row blocks at 128; 128x192 down_proj: columns that do not
    # tile by 128, which llm-compressor cannot write: ignored by name
    src = tiny_llama(tmp_path / "llama", intermediate_size=192)
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme, block, *args)
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) == fp8


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("scheme", [s for s, _ in CT_SCHEMES])
def test_per_expert_moe_matches_llm_compressor(llmc_python, tmp_path, family, scheme):
    """`model_free_ptq` quantizes each stored expert Linear by its name, as vLLM loads it; routers ignored."""
    from tests.model_zoo import save_family

    src = save_family(family, tmp_path / family)
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, dict(CT_SCHEMES)[scheme], 128,
                                            "--scheme", scheme)
    experts = [n for n, t in tensors.items() if ".experts." in n and t.dtype == torch.float8_e4m3fn]
    n_experts = {"qwen3_moe": 4 * 3 * 2, "mixtral": 4 * 3 * 2, "deepseek_v3": 64 * 3}[family]
    if (family, scheme) == ("deepseek_v3", "fp8-block"):  # 64-column down_proj: no 128-wide block, ignored by name
        n_experts = 64 * 2
    assert len(experts) == n_experts
    routers = [n for n in tensors if n.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight"))]
    assert routers and all(tensors[n].dtype == torch.bfloat16 for n in routers)


@pytest.mark.slow
def test_bert_matches_llm_compressor(llmc_python, tmp_path):
    src = tiny_bert(tmp_path / "bert")
    # the MLM decoder is tied to the embeddings: not stored, so it must be excluded (the cross-check says so)
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, "FP8_DYNAMIC", 128, "--scheme", "fp8-dynamic",
                                            "--exclude", "cls.predictions.decoder")
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) == 13  # 6 per layer and the MLM transform


@pytest.mark.slow
@pytest.mark.parametrize("args,scheme,block", [(("--block-size", "64"), "FP8_BLOCK", 64), ((), "FP8_BLOCK", 128),
                                               (("--scheme", "fp8-dynamic"), "FP8_DYNAMIC", 128)])
def test_gemma4_matches_llm_compressor(llmc_python, gemma_src, tmp_path, args, scheme, block):
    tensors = assert_same_as_llm_compressor(llmc_python, gemma_src, tmp_path, scheme, block, *args)
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) > 20


# ---- per-expert MoE in compressed-tensors: the Linears vLLM and compressed-tensors match by name ----------------

@pytest.mark.parametrize("scheme", [s for s, _ in CT_SCHEMES])
@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_per_expert_moe_converts_to_compressed_tensors_with_the_cross_check(tmp_path, scheme, source):
    """Each expert's Linear is a Linear for this dialect's loaders (the cross-check and verify agree), routers
    stay in the source dtype and are ignored by name."""
    from tests.model_zoo import save_family

    src = save_family("qwen3_moe", tmp_path / "moe")
    if source == "fp8":
        src = convert(src, tmp_path / "moe-fp8")
    result = run_cli("--src", src, "--dst", tmp_path / "dry", "--format", "compressed-tensors", "--scheme", scheme,
                     "--dry-run")
    assert "      24  FP8 weight, expert Linear (per-expert, fused at load)" in result.output, result.output
    assert "tensor set checked against: module names, as compressed-tensors and vLLM match them" in result.output
    dst = convert(src, tmp_path / "ct", "--format", "compressed-tensors", "--scheme", scheme)
    report = verify(dst, src)
    assert report.ok, report.problems
    o = tensors_of(dst)
    experts = [n for n in o if ".experts." in n and n.endswith("_proj.weight")]
    assert len(experts) == 24 and all(o[n].dtype == torch.float8_e4m3fn for n in experts)
    routers = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(o[f"{r}.weight"].dtype == torch.bfloat16 for r in routers)
    assert set(routers) <= set(json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"])


# ---- compressed-tensors MXFP8 ---------------------------------------------------------------------------------

def mx_edge_weight(dtype, rows=96, cols=256, seed=2):
    """Random values with the MX edge cases, each in its own 32-column group of row 0 to 5: an all-zero group, a
    group whose maximum is exactly a power of two, one whose maximum is just below 448 * 2**k (and one at it),
    subnormals, and values far above E4M3's range."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.02
    w[0, :32] = 0  # all-zero group
    w[1, 32:64] *= 0.1
    w[1, 40] = 2.0 ** -3  # maximum exactly a power of two
    w[2, 64:96] *= 0.1
    w[2, 70] = -446 * 2.0 ** -6  # just below 448 * 2**-6 in BF16: 1.742 * 2**2, rounds down to 2**2
    w[3, 96:128] *= 0.1
    w[3, 100] = 448 * 2.0 ** -6  # 1.75 * 2**2: rounds up to 2**3
    if dtype != torch.float16:
        w[4, 128:160] = 1e-39  # float32-subnormal (BF16 has the same range)
        w[4, 130] = -3e-39
        w[5, 160:192] *= 2.0 ** 100  # far above E4M3's range
    else:
        w[4, 128:160] = 2.0 ** -20  # F16-subnormal
    w[6:8, :] = 0  # whole zero rows
    return w.to(dtype)


def compressed_tensors_mx_reference(weight: torch.Tensor, scheme: str = "MXFP8"):
    """compressed-tensors' own MX math: per-group min/max -> `calculate_qparams` (its `generate_mx_scales`) ->
    `quantize` -> `compress_mx_scale`, as `model_free_ptq` runs them."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = preset_name_to_scheme(scheme, ["Linear"]).weights
    groups = weight.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)
    return quantize(weight, scale, None, args, dtype=torch.float8_e4m3fn), compress_mx_scale(scale, torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme", ["MXFP8", "MXFP8A16"])
def test_mx_formula_bytes_match_compressed_tensors(dtype, scheme):
    from converter.dialects.compressed_tensors import quantize_mx

    w = mx_edge_weight(dtype)
    fp8, exponents = quantize_mx(w)
    ref_fp8, ref_exponents = compressed_tensors_mx_reference(w, scheme)
    assert exponents.dtype == torch.uint8 and exponents.shape == (96, 8)
    assert as_bytes(fp8) == as_bytes(ref_fp8)
    assert as_bytes(exponents) == as_bytes(ref_exponents)
    # an all-zero group: exponent 0 (scale 2**-127) in BF16 and F32; F16 cannot hold 2**-127, its zero becomes
    # uint8's eps, 1.0 (127)
    assert exponents[0, 0] == (127 if dtype == torch.float16 else 0)
    assert exponents[1, 1] == 127 - 3 - 8  # maximum 2**-3 exactly
    assert exponents[2, 2] == 127 + 2 - 8 and fp8[2, 70].float() == -448  # -446 rounded to E4M3
    assert exponents[3, 3] == 127 + 3 - 8 and fp8[3, 100].float() == 224
    if dtype != torch.float16:
        assert exponents[5, 5] > 127 + 100 - 8 - 8  # 2**100 times the group's maximum, about 2**-5
        assert exponents[4, 4] == 0  # 3e-39 rounds to no power of two that BF16's 2**-127 scale resolves


@pytest.mark.parametrize("scheme,acts", [("mxfp8", True), ("mxfp8a16", False)])
def test_mx_conversion_config_verify_load_and_logits(tmp_path, scheme, acts):
    src = tiny_llama(tmp_path / "llama", intermediate_size=200)  # down_proj 128x200: 200 is not a multiple of 32
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors", "--scheme", scheme)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    name = scheme.upper()
    assert list(qc["config_groups"]) == [name] and qc["format"] == "mxfp8-quantized"
    group = qc["config_groups"][name]
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    assert group["weights"]["scale_dtype"] == "torch.uint8"
    assert (group["input_activations"] is not None) == acts
    assert qc["ignore"][:2] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ours, dtypes = tensors_of(dst), header_dtypes(dst)
    assert dtypes["model.layers.0.mlp.up_proj.weight_scale"] == "U8"
    assert ours["model.layers.0.mlp.up_proj.weight_scale"].shape == (200, 4)
    assert ours["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert sum(t.dtype == torch.float8_e4m3fn for t in ours.values()) == 12
    report = verify(dst, src)
    assert report.ok, [str(p) for p in report.problems]
    assert report.fp8_tensors == 12
    assert_loads_our_bytes_with_close_logits(dst, src, ours)
    card = (dst / "README.md").read_text()
    assert "MXFP8 (microscaling, one power-of-two scale per 32 columns) version of" in card
    assert f"byte-identical to llm-compressor's `model_free_ptq` (llmcompressor 0.14.0.1, scheme\n  {name})" in card


def test_mx_dry_run_and_contradictions(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=200)
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--format", "compressed-tensors", "--scheme", "mxfp8",
                     "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("dialect: compressed-tensors MXFP8 (mxfp8-quantized), one power-of-two scale per 32 columns (E8M0, U8), "
            "MXFP8 activations at run time") in lines
    assert "      12  scale (weight_scale, U8)" in lines
    assert "       2  shape 128x200: columns are not a multiple of 32 (llm-compressor 0.14 cannot write such a " \
           "weight)" in lines
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--format", "compressed-tensors", "--scheme",
                     "mxfp8a16", "--block-size", "64")
    assert result.exit_code == 2
    assert "--block-size does not apply to --scheme mxfp8a16 (one scale per 32 columns)" in result.output
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--scheme", "mxfp8")
    assert result.exit_code == 2
    assert "--scheme mxfp8 is a compressed-tensors scheme: add --format compressed-tensors" in result.output


def test_mx_scale_changed_is_found(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    dst = convert(src, tmp_path / "out", "--format", "compressed-tensors", "--scheme", "mxfp8",
                  "--max-shard-size", "10GB")
    from safetensors.torch import load_file, save_file

    shard = dst / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.o_proj.weight_scale"][0, 1] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    messages = [str(p) for p in verify(dst, src).problems]
    assert any("tensor model.layers.1.self_attn.o_proj.weight_scale" in m and "weight_scale differs from the "
               "re-quantized source, first at tile (0, 1)" in m for m in messages), messages


def with_mx_edges(src: Path, name: str) -> torch.Tensor:
    """Write `mx_edge_weight` (its shape cut to the tensor's) into tensor `name` of a checkpoint."""
    from safetensors.torch import load_file, save_file

    index = src / "model.safetensors.index.json"
    shard = src / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
    tensors = load_file(shard)
    rows, cols = tensors[name].shape
    w = mx_edge_weight(tensors[name].dtype, rows=max(rows, 8), cols=max(cols, 256))[:rows, :cols].contiguous()
    tensors[name] = w
    save_file(tensors, shard, metadata={"format": "pt"})
    return w


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["mxfp8", "mxfp8a16"])
def test_llama_mx_matches_llm_compressor(llmc_python, tmp_path, scheme):
    # down_proj 128x200: 200 columns are not a multiple of 32; llm-compressor fails on it, we keep it and ignore it
    src = tiny_llama(tmp_path / "llama", intermediate_size=200)
    with_mx_edges(src, "model.layers.0.mlp.up_proj.weight")  # 200x128
    with_mx_edges(src, "model.layers.1.self_attn.o_proj.weight")  # 128x128
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme.upper(), 128, "--scheme", scheme)
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) == 12
    exponents = tensors["model.layers.0.mlp.up_proj.weight_scale"]
    assert exponents[0, 0] == 0 and exponents[1, 1] == 116 and exponents[3, 3] == 122
    if scheme == "mxfp8":
        ours = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["ignore"]
        ignore = [e for e in ours if e != "model.layers.0.mlp.down_proj"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        result = subprocess.run([str(llmc_python), "-c", LLMC_SCRIPT, str(src), str(tmp_path / "fails"), "MXFP8",
                                 "128", json.dumps(ignore)], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode != 0
        assert "Unable to quantize tensor `model.layers.0.mlp.down_proj.weight`" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["mxfp8", "mxfp8a16"])
def test_bert_mx_matches_llm_compressor(llmc_python, tmp_path, scheme):
    src = tiny_bert(tmp_path / "bert")
    with_mx_edges(src, "bert.encoder.layer.0.intermediate.dense.weight")  # 256x128
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme.upper(), 128, "--scheme", scheme,
                                            "--exclude", "cls.predictions.decoder")
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) == 13


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["mxfp8", "mxfp8a16"])
def test_gemma4_mx_matches_llm_compressor(llmc_python, gemma_src, tmp_path, scheme):
    import shutil

    src = Path(shutil.copytree(gemma_src, tmp_path / "gemma"))
    with_mx_edges(src, "model.language_model.layers.0.mlp.up_proj.weight")
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme.upper(), 128, "--scheme", scheme)
    assert sum(t.dtype == torch.float8_e4m3fn for t in tensors.values()) > 20


# ---- dequantize reads what llm-compressor writes (slow) -----------------------------------------------------------

LLMC_DECOMPRESS = """
import json, sys, torch, transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CompressedTensorsConfig
src, out = sys.argv[1], sys.argv[2]
arch = json.load(open(src + "/config.json"))["architectures"][0]
model = getattr(transformers, arch).from_pretrained(src, dtype="auto",
                                                   quantization_config=CompressedTensorsConfig(run_compressed=False))
state = model.state_dict()
index = json.load(open(src + "/model.safetensors.index.json"))["weight_map"] if len(sys.argv) < 4 else None
names = []
for shard in sorted(set(index.values())) if index else ["model.safetensors"]:
    with safe_open(src + "/" + shard, "pt") as f:
        names += [k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"]
save_file({n: state[n].contiguous() for n in names}, out)
"""

LLMC_STATIC_FP8 = """
import sys, torch, transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from tokenizers import Tokenizer, models
src, dst = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
processor = transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]", pad_token="[UNK]")
torch.manual_seed(0)
ds = Dataset.from_dict({"input_ids": [torch.randint(0, 256, (16,)).tolist() for _ in range(4)],
                        "attention_mask": [[1] * 16 for _ in range(4)]})
oneshot(model=model, processor=processor, dataset=ds, num_calibration_samples=4, max_seq_length=16, output_dir=dst,
        recipe=QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"]))
"""


def run_llmc(python: Path, script: str, *args) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([str(python), "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "FP8_DYNAMIC", "MXFP8", "MXFP8A16", "FP8"])
def test_dequantize_of_llm_compressor_equals_compressed_tensors_decompression(llmc_python, tmp_path, scheme):
    """llm-compressor's own outputs (`model_free_ptq`; for per-tensor FP8 with static activation scales, which it
    calibrates, `oneshot`), dequantized, against compressed-tensors' decompression run beside it."""
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    theirs = tmp_path / "theirs"
    if scheme == "FP8":
        run_llmc(llmc_python, LLMC_STATIC_FP8, src, theirs)
    else:
        llm_compressor(llmc_python, src, theirs, scheme, 128, ["lm_head", "model.embed_tokens",
                                                               "model.layers.1.mlp.down_proj"])
    reference = tmp_path / "reference.safetensors"
    run_llmc(llmc_python, LLMC_DECOMPRESS, theirs, reference, *(["one-file"] if scheme == "FP8" else []))
    result = run_cli("dequantize", "--src", theirs, "--dst", tmp_path / "bf16", "-q")
    assert result.exit_code == 0, result.output
    ours, source = tensors_of(tmp_path / "bf16"), tensors_of(src)
    from safetensors.torch import load_file

    ref = load_file(reference)
    assert len(ref) == (14 if scheme == "FP8" else 13)
    assert not any(n.endswith(("_scale", "input_scale")) for n in ours)
    for name, weight in ref.items():
        assert weight.dtype == ours[name].dtype == torch.bfloat16
        assert as_bytes(ours[name]) == as_bytes(weight), name
    for name in ["lm_head.weight"] + (["model.layers.1.mlp.down_proj.weight"] if scheme != "FP8" else []):
        assert as_bytes(ours[name]) == as_bytes(source[name]), name  # ignored: copied
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config
    if scheme != "FP8":
        assert config == json.loads((src / "config.json").read_text())


# ---- resume, parts and determinism hold in every dialect -----------------------------------------------------

@pytest.mark.parametrize("dialect", [("--format", "compressed-tensors", "--scheme", "fp8-dynamic"),
                                     ("--format", "compressed-tensors"), ("--scale-fmt", "ue8m0"),
                                     ("--format", "compressed-tensors", "--scheme", "mxfp8")])
def test_resume_and_parts_give_the_bytes_of_one_run(tmp_path, dialect):
    from tests.conftest import synthetic, tree_digest
    from tests.test_resume import killed_run

    src = synthetic(tmp_path / "toy")
    common = ("--max-shard-size", "20MB", "--no-arch-check", *dialect)
    reference = convert(src, tmp_path / "reference", *common)
    again = convert(src, tmp_path / "again", *common)
    assert tree_digest(again) == tree_digest(reference)  # deterministic
    dst = tmp_path / "resumed"
    killed_run("--src", src, "--dst", dst, *common, mode=("pieces", "9"))
    result = run_cli("--src", src, "--dst", dst, *common)
    assert result.exit_code == 0 and "resumed: kept" in result.output, result.output
    assert tree_digest(dst) == tree_digest(reference)
    parts = tmp_path / "parts"
    assert run_cli("--src", src, "--dst", parts, *common, "--part", "1/2").exit_code == 0
    killed_run("--src", src, "--dst", parts, *common, "--part", "2/2", mode=("finalize",))
    result = run_cli("finalize", "--dst", parts)
    assert result.exit_code == 0, result.output
    assert tree_digest(parts) == tree_digest(reference)


def test_dry_run_names_the_dialect_and_its_servers(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--format", "compressed-tensors", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "dialect: compressed-tensors FP8_BLOCK (float-quantized), 128x128 blocks, scales in the weight dtype" in lines
    assert "loaded by: vLLM (compressed-tensors), transformers with compressed-tensors installed, SGLang" in lines
    assert r"ignore: ['lm_head', 're:model\\.vision_tower($|\\.)', 'model.embed_tokens']" in lines
    assert "      14  scale (weight_scale, BF16)" in lines
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--scale-fmt", "ue8m0", "--dry-run")
    assert "dialect: transformers fp8 (quant_method fp8), 64x64 blocks, power-of-two UE8M0 scales (F8_E8M0)" \
        in result.output.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("args,scheme", [((), "FP8_BLOCK"), (("--scheme", "fp8-dynamic"), "FP8_DYNAMIC")])
def test_edge_values_match_llm_compressor(llmc_python, tmp_path, args, scheme):
    """Signed zeros, BF16-subnormal and huge values, all-zero blocks and rows, written into a real checkpoint."""
    from safetensors.torch import load_file, save_file

    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    name = "model.layers.0.mlp.up_proj.weight"  # 256x128
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    torch.manual_seed(3)
    w = torch.randn(256, 128) * 0.02
    w[0, 0] = 2.0 ** 100  # huge: everything else in its block and row becomes a signed zero
    w[1, :] = -3e-39  # BF16-subnormal
    w[2, 5] = 250.0
    w[200:, :] = 0  # all-zero rows (channel scale eps) and a zero half-block
    w = w.to(torch.bfloat16)
    tensors[name] = w
    save_file(tensors, shard, metadata={"format": "pt"})
    ours = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme, 128, *args)
    assert (ours[name].view(torch.uint8) == 0x80).any()  # -0.0 kept, as llm-compressor keeps it


@pytest.mark.parametrize("args,path", [
    (("--format", "compressed-tensors", "--scheme", "fp8-dynamic"),
     "14 FP8 modules: all kept as the checkpoint's FP8 weights and scales"),
    (("--scale-fmt", "ue8m0"), "14 FP8 modules: all dequantized from their FP8 blocks and scales"),
    (("--format", "compressed-tensors", "--scheme", "mxfp8"),
     "14 FP8 modules: all kept as the checkpoint's FP8 weights and scales"),
])
def test_validate_passes_in_every_dialect(tmp_path, args, path):
    from converter.validate import validate

    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    dst = convert(src, tmp_path / "out", *args)
    report = validate(dst, src, device="cpu")
    checks = {c.name: c for c in report.checks}
    assert report.ok, [(c.name, c.detail) for c in report.checks if not c.ok]
    assert checks["fp8 path"].detail == path
    assert checks["load"].detail == "LlamaForCausalLM loaded"


def test_model_card_names_the_dialect(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    card = (convert(src, tmp_path / "out", "--format", "compressed-tensors", "--scheme", "fp8-dynamic")
            / "README.md").read_text()
    assert "FP8 (per-channel) version of" in card
    assert ("- 14 Linear weights stored as FP8 E4M3 with one scale per output channel (`weight_scale`, in the "
            "weight's dtype),\n  byte-identical to llm-compressor's `model_free_ptq` (llmcompressor 0.14.0.1, scheme "
            "FP8_DYNAMIC)") in card
    assert "- Kept in the source dtype, by module path (`ignore`):\n  - `lm_head`\n  - `re:model\\.vision_tower($|\\.)`\n" \
           "  - `model.embed_tokens`\n" in card
    card = (convert(src, tmp_path / "ue8m0", "--scale-fmt", "ue8m0") / "README.md").read_text()
    assert '`FineGrainedFP8Config(weight_block_size=(64, 64), scale_fmt="ue8m0")` quantization' in card


@pytest.mark.parametrize("args,row", [(("--format", "compressed-tensors"), 128),
                                      (("--format", "compressed-tensors", "--scheme", "fp8-dynamic"), 130),
                                      (("--scale-fmt", "ue8m0"), 128)])
def test_non_finite_source_is_refused_in_every_dialect(tmp_path, args, row):
    from safetensors.torch import load_file, save_file

    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    name = "model.layers.1.mlp.gate_proj.weight"  # 256x128
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][130, 7] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    result = run_cli("--src", src, "--dst", tmp_path / "out", *args)
    assert result.exit_code == 1
    assert f"tensor {name} in shard {shard.name} holds NaN or Inf (near row {row})" in result.output
    assert not (tmp_path / "out").exists()


def test_the_fused_kernel_is_refused_where_it_would_not_give_the_dialect_s_bytes(tmp_path, monkeypatch):
    """A torch whose log2 the ue8m0 kernel cannot follow (no table): --quantizer numba is refused, auto runs the
    formula."""
    from converter.dialects import transformers_fp8

    monkeypatch.setattr(transformers_fp8, "ue8m0_table", lambda: None)
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--scale-fmt", "ue8m0", "--quantizer", "numba")
    assert result.exit_code == 2
    assert "--quantizer numba: this torch's formula for transformers fp8 (quant_method fp8), 64x64 blocks, " \
           "power-of-two UE8M0 scales (F8_E8M0) has no fused kernel that matches it" in result.output
    result = run_cli("--src", src, "--dst", tmp_path / "auto", "--scale-fmt", "ue8m0")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("args,scheme", [((), "FP8_BLOCK"), (("--scheme", "fp8-dynamic"), "FP8_DYNAMIC")])
def test_f16_and_f32_sources_match_llm_compressor(llmc_python, tmp_path, dtype, args, scheme):
    src = tiny_llama(tmp_path / "llama", dtype=dtype, intermediate_size=256)
    tensors = assert_same_as_llm_compressor(llmc_python, src, tmp_path, scheme, 128, *args)
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == dtype  # the weight's own dtype


def test_ue8m0_on_a_torch_without_e8m0_is_one_line(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "llama", intermediate_size=256)
    monkeypatch.delattr(torch, "float8_e8m0fnu")
    result = run_cli("--src", src, "--dst", tmp_path / "out", "--scale-fmt", "ue8m0")
    assert result.exit_code == 2
    assert "--scale-fmt ue8m0 needs torch 2.7 or newer (torch.float8_e8m0fnu); this is torch" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["gemma4", "gemma4-moe", "bert"])
def test_ue8m0_bytes_match_transformers_on_gemma4_moe_and_bert(tmp_path, gemma_src, model):
    """Every FP8 tensor and scale, fused 3-D experts included, against transformers' own `Fp8Quantize`."""
    if model == "gemma4":
        src = gemma_src
    elif model == "gemma4-moe":
        src = build_checkpoint(tmp_path / "moe", gemma4_moe_config())
    else:
        src = tiny_bert(tmp_path / "bert")
    extra = ("--exclude", "cls.predictions.decoder") if model == "bert" else ()
    dst = convert(src, tmp_path / "out", "--scale-fmt", "ue8m0", *extra)
    ours, source = tensors_of(dst), tensors_of(src)
    fp8 = [n for n, t in ours.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8 and (model != "gemma4-moe" or any(n.endswith("experts.gate_up_proj") for n in fp8))
    for name in fp8:
        ref = transformers_ue8m0(name, source[name])
        scale = name.rsplit(".", 1)[0] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        assert as_bytes(ours[name]) == as_bytes(ref[name]), name
        assert as_bytes(ours[scale]) == as_bytes(ref[scale]), scale
    assert verify(dst, src).ok
