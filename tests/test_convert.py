"""End to end: a tiny Gemma-4 with the 31B structure, converted by the CLI, checked tensor by tensor against
transformers' own quantizer, then loaded by transformers."""

import json

import pytest
import torch
from safetensors import safe_open

from converter.demo import PLANTED_OUTLIER, PLANTED_TINY_TILE, PLANTED_ZERO_TILE

from .conftest import read_json, run_cli, tiny_llama, tree_digest
from .test_quantize import reference


def load_all(folder):
    """Every tensor of a checkpoint folder, by name, through safetensors itself."""
    weight_map = read_json(folder / "model.safetensors.index.json")["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(folder / shard, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return weight_map, tensors


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_every_fp8_tensor_matches_transformers_and_the_rest_is_copied(gemma_src, gemma_dst):
    _, src = load_all(gemma_src)
    weight_map, out = load_all(gemma_dst)
    fp8_names = {k for k, v in out.items() if v.dtype == torch.float8_e4m3fn}
    assert len(fp8_names) == 27
    for name in fp8_names:
        ref_fp8, ref_scale = reference(src[name], 64)
        assert raw(out[name]) == raw(ref_fp8), name
        assert raw(out[name + "_scale_inv"]) == raw(ref_scale), name
    copied = set(out) - fp8_names - {n + "_scale_inv" for n in fp8_names}
    assert copied == set(src) - fp8_names
    for name in copied:
        assert out[name].dtype == src[name].dtype and raw(out[name]) == raw(src[name]), name
    # the planted tiles
    assert out[PLANTED_ZERO_TILE + "_scale_inv"][0, 0].item() == 1.0
    assert out[PLANTED_ZERO_TILE][:64, :64].view(torch.uint8).eq(0).all()
    assert out[PLANTED_OUTLIER + "_scale_inv"][0, 0].item() == pytest.approx(60.0 / 448.0, rel=1e-6)
    assert out[PLANTED_TINY_TILE + "_scale_inv"][1, 0].item() < 1e-6


def test_index_is_exact(gemma_dst):
    weight_map, out = load_all(gemma_dst)
    index = read_json(gemma_dst / "model.safetensors.index.json")
    assert list(index) == ["metadata", "weight_map"]
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in out.values())}
    assert set(weight_map) == set(out)
    for shard in set(weight_map.values()):
        with safe_open(gemma_dst / shard, "pt") as f:
            assert {k for k, v in weight_map.items() if v == shard} == set(f.keys())
    shards = sorted(p.name for p in gemma_dst.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 1


def test_config_is_the_source_config_plus_quantization_config(gemma_src, gemma_dst):
    source, converted = read_json(gemma_src / "config.json"), read_json(gemma_dst / "config.json")
    qc = converted.pop("quantization_config")
    assert converted == source
    vision_linears = [f"model.vision_tower.encoder.layers.{i}.{m}.linear" for i in range(2)
                      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(qc.pop("ignored_layers")) == sorted(vision_linears + ["model.vision_tower.patch_embedder.input_proj"])
    assert qc == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [64, 64],
        "modules_to_not_convert": ["model.vision_tower", "lm_head"],
        "dequantize": False,
        "scale_fmt": "float",
    }


def test_other_files_are_copied_and_a_card_written(gemma_src, gemma_dst):
    for rel in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                "1_Pooling/config.json"):
        assert (gemma_dst / rel).read_bytes() == (gemma_src / rel).read_bytes(), rel
    card = (gemma_dst / "README.md").read_text()
    # a local folder is no Hub id: the card names it in the text, not as `base_model` (the Hub would refuse it)
    assert "version of `gemma-4-tiny`" in card and "base_model" not in card and "weight_block_size=(64, 64)" in card
    assert "- `model.vision_tower`" in card and "convert-fp8 0.1.0" in card
    assert not (gemma_dst / ".convert-fp8.partial").exists()


def test_transformers_loads_it_and_gives_the_quantize_dequantize_logits(gemma_src, gemma_dst):
    from transformers import Gemma4ForConditionalGeneration

    fp8_model, info = Gemma4ForConditionalGeneration.from_pretrained(gemma_dst, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    reference_model = Gemma4ForConditionalGeneration.from_pretrained(gemma_src, dtype=torch.bfloat16).eval()
    _, out = load_all(gemma_dst)
    params = dict(reference_model.named_parameters())
    with torch.no_grad():
        for name, t in out.items():
            if t.dtype == torch.float8_e4m3fn:  # what transformers' own quantize-dequantize gives
                rows, cols = t.shape
                scale = out[name + "_scale_inv"]
                deq = t.float().reshape(rows // 64, 64, cols // 64, 64) * scale[:, None, :, None]
                params[name].copy_(deq.reshape(rows, cols).to(torch.bfloat16))
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        got, want = fp8_model(input_ids=ids).logits, reference_model(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype, code", [(torch.float16, "F16"), (torch.float32, "F32")])
def test_f16_and_f32_sources(dtype, code, tmp_path):
    src = tiny_llama(tmp_path / "src", dtype=dtype)
    result = run_cli("--src", src, "--dst", tmp_path / "dst", "--config", "default")
    assert result.exit_code == 0, result.output
    _, s = load_all(src)
    _, o = load_all(tmp_path / "dst")
    name = "model.layers.1.mlp.down_proj.weight"
    assert s[name].dtype == dtype
    ref_fp8, ref_scale = reference(s[name], 64)
    assert raw(o[name]) == raw(ref_fp8) and raw(o[name + "_scale_inv"]) == raw(ref_scale)
    assert raw(o["model.norm.weight"]) == raw(s["model.norm.weight"])


def test_output_is_deterministic(gemma_src, gemma_dst, tmp_path):
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "again", "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "again") == tree_digest(gemma_dst)


def test_overwrite_replaces_old_output(gemma_src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.safetensors").write_bytes(b"old")
    result = run_cli("--src", gemma_src, "--dst", dst, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (dst / "stale.safetensors").exists()
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert "27 tensors to FP8, 60 copied, 5 other files" in result.output


def test_single_file_source_gives_one_model_safetensors_without_index(tmp_path):
    from transformers import LlamaForCausalLM

    from converter.verify import verify

    src = tmp_path / "single"
    LlamaForCausalLM.from_pretrained(tiny_llama(tmp_path / "sharded")).save_pretrained(src)  # one file, as saved
    assert sorted(p.name for p in src.glob("model*")) == ["model.safetensors"]
    result = run_cli("--src", src, "--dst", tmp_path / "dst", "--config", "llama")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dst").glob("model*")) == ["model.safetensors"]
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    report = verify(tmp_path / "dst", src)
    assert report.ok, report.problems
    assert report.fp8_tensors == 14 and report.tensors_checked == 14 * 2 + 7  # + embeddings, norms, lm_head
    _, info = LlamaForCausalLM.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
