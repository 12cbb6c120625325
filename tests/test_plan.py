"""The plan: which tensors become FP8, the exclusion rules, shards and the output config, from headers only."""

import json
import math
from pathlib import Path

import pytest
from transformers.quantizers.quantizers_utils import should_convert_module as transformers_rule

from converter import arch
from converter.configs import FP8Scheme
from converter.errors import PlanError
from converter.plan import QUANTIZE, SCALE, classify, make_plan, should_convert_module
from converter.source import SourceIndex, TensorInfo, open_source

from .conftest import read_json, run_cli, tiny_bert, tiny_llama

NAMES = [
    "model.vision_tower.encoder.layers.0.mlp.up_proj.linear",
    "model.language_model.layers.1.self_attn.q_proj",
    "model.language_model.layers.11.self_attn.q_proj",
    "model.embed_vision.embedding_projection",
    "lm_head",
    "model.layers.0.mlp.gate_proj",
]
PATTERNS = [
    ["model.vision_tower"], ["vision_tower"], ["lm_head"], ["model.language_model.layers.1"],
    ["model.language_model.layers.1.*"], ["mlp.gate"], ["gate_proj"], [r"model\.layers\.\d+\.mlp"], [],
]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_matching_is_transformers_own(patterns):
    for name in NAMES:
        assert should_convert_module(name, patterns) == transformers_rule(name, patterns), (name, patterns)


def info(name, shape, dtype="BF16"):
    return TensorInfo(name=name, dtype=dtype, shape=shape, shard="s", offset=0, nbytes=0)


@pytest.mark.parametrize(
    "name, shape, dtype, kind",
    [
        ("model.layers.0.mlp.down_proj.weight", (64, 128), "BF16", "linear"),
        ("model.embed_vision.embedding_projection.weight", (128, 64), "BF16", "linear"),
        ("model.language_model.embed_tokens.weight", (512, 128), "BF16", "other"),
        ("bert.embeddings.word_embeddings.weight", (512, 128), "BF16", "other"),
        ("transformer.wte.weight", (512, 128), "F32", "other"),
        ("model.norm.weight", (128,), "BF16", "other"),
        ("model.layers.0.self_attn.q_proj.bias", (128,), "BF16", "other"),
        ("model.layers.0.layer_scalar", (1,), "BF16", "other"),
        ("model.layers.0.mlp.experts.gate_up_proj", (4, 256, 128), "BF16", "experts"),
        ("model.vision_tower.patch_embedder.position_embedding_table", (2, 64, 64), "BF16", "other"),
        ("model.layers.0.mlp.gate_proj.weight", (64, 128), "I32", "other"),
    ],
)
def test_classify(name, shape, dtype, kind):
    assert classify(info(name, shape, dtype))[0] == kind


def test_gemma_plan_fates_and_config(gemma_src):
    source = open_source(gemma_src)
    plan = make_plan(source, FP8Scheme(64), ("model.vision_tower", "lm_head"), 5 * 10**9)
    # 4 layers: 7 Linears in sliding layers 0 and 2, 6 in full layers 1 and 3 (no v_proj), plus embed_vision.
    assert len(plan.fp8_modules) == 27
    assert "model.embed_vision.embedding_projection" in plan.fp8_modules
    assert not any("vision_tower" in m for m in plan.fp8_modules)
    assert len(plan.kept_linears) == 15 and set(plan.kept_linears.values()) == {"excluded by 'model.vision_tower'"}
    assert plan.modules_to_not_convert == ("model.vision_tower", "lm_head")
    assert plan.ignored_layers == tuple(plan.kept_linears)
    tensors = plan.tensors
    for i, t in enumerate(tensors):  # each FP8 weight is followed by its scale, of the ceil shape
        if t.action == QUANTIZE:
            assert tensors[i + 1].action == SCALE and tensors[i + 1].name == t.name + "_scale_inv"
            assert tensors[i + 1].shape == (t.shape[0] // 64, t.shape[1] // 64)
    assert [p for p, _ in plan.unmatched_patterns] == ["lm_head"]
    assert "tied" in plan.unmatched_patterns[0][1]
    assert arch.cross_check(plan) is None


def test_bare_pattern_is_reported_with_the_full_path(gemma_src, tmp_path):
    result = run_cli("--src", gemma_src, "--dst", tmp_path / "out", "--config", "gemma-4-31b-it",
                     "--exclude", "vision_tower", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "pattern 'vision_tower' matches no Linear in the checkpoint: did you mean 'model.vision_tower'?" in result.output
    assert "27  FP8 weight" in result.output
    assert "dry run: nothing written" in result.output
    assert not (tmp_path / "out").exists()


def test_linear_that_does_not_tile_is_kept_and_excluded_by_full_name(tmp_path):
    src = tiny_llama(tmp_path / "llama", intermediate_size=96)  # gate/up 96x128, down 128x96: no 64 tiling
    plan = make_plan(open_source(src), FP8Scheme(64), ("lm_head",), 5 * 10**9)
    assert plan.kept_linears["model.layers.0.mlp.gate_proj"] == "shape 96x128 does not tile by 64"
    assert plan.kept_linears["model.layers.1.mlp.down_proj"] == "shape 128x96 does not tile by 64"
    assert plan.modules_to_not_convert[0] == "lm_head"
    assert "model.layers.0.mlp.up_proj" in plan.modules_to_not_convert
    assert len(plan.fp8_modules) == 8  # q, k, v, o in 2 layers
    assert plan.config["quantization_config"]["ignored_layers"] == list(plan.kept_linears)
    assert arch.cross_check(plan) is None


@pytest.mark.parametrize("builder, patterns, expected_fp8", [
    (tiny_llama, ("lm_head",), 14),
    (tiny_bert, ("cls.predictions.decoder",), 13),  # 6 per layer, plus cls.predictions.transform.dense
])
def test_arch_cross_check_agrees_with_transformers(builder, patterns, expected_fp8, tmp_path):
    plan = make_plan(open_source(builder(tmp_path / "m")), FP8Scheme(64), patterns, 5 * 10**9)
    assert len(plan.fp8_modules) == expected_fp8
    found = arch.placement(plan.config, [t.name for t in plan.tensors])
    roles = {t.name: found.role(t.name) for t in plan.tensors}
    assert {n for n, r in roles.items() if r == arch.FP8} == {t.name for t in plan.tensors if t.action == QUANTIZE}
    assert {n for n, r in roles.items() if r == arch.SCALE} == {t.name for t in plan.tensors if t.action == SCALE}
    assert found.unset == ()


def test_arch_cross_check_refuses_a_tied_head_left_to_fp8(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    plan = make_plan(open_source(src), FP8Scheme(64), ("lm_head",), 5 * 10**9)
    with pytest.raises(PlanError, match=r"first 'cls.predictions.decoder'.*--exclude cls.predictions.decoder"):
        arch.cross_check(plan)


def test_shards_respect_the_cap_and_keep_weight_with_scale(gemma_src):
    plan = make_plan(open_source(gemma_src), FP8Scheme(64), ("model.vision_tower", "lm_head"), 100_000)
    assert len(plan.shards) > 5
    for shard in plan.shards:
        assert shard.nbytes <= 100_000 or len({t.source for t in shard.tensors}) == 1
        assert shard.tensors[0].action != SCALE
    assert [s.name for s in plan.shards][:1] == [f"model-00001-of-{len(plan.shards):05d}.safetensors"]


def test_already_quantized_source_is_refused(gemma_copy):
    config = read_json(gemma_copy / "config.json")
    config["quantization_config"] = {"quant_method": "fp8"}
    (gemma_copy / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises(PlanError, match="already quantized"):
        make_plan(open_source(gemma_copy), FP8Scheme(64), (), 5 * 10**9)


def test_invalid_regex_pattern_is_refused(gemma_src):
    with pytest.raises(PlanError, match="not a valid regular expression"):
        make_plan(open_source(gemma_src), FP8Scheme(64), ("model.(",), 5 * 10**9)


INVENTORY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gemma-4-31b-it.tensors.json"


@pytest.mark.skipif(not INVENTORY.is_file(), reason=f"no tensor inventory of gemma-4-31B-it at {INVENTORY}")
def test_plan_of_the_real_31b_from_its_inventory():
    """The full gemma-4-31B-it, planned from its 1,188 tensor headers (no data): the published FP8 checkpoint
    has 411 FP8 Linear weights, 1,599 keys and 33.3 GB; transformers' own module set agrees."""
    inventory = json.loads(INVENTORY.read_text())
    tensors, offset = {}, 0
    for t in inventory["tensors"]:
        nbytes = 2 * math.prod(t["shape"])  # every tensor is BF16
        tensors[t["name"]] = TensorInfo(t["name"], t["dtype"], tuple(t["shape"]), "model.safetensors", offset, nbytes)
        offset += nbytes
    source = SourceIndex(root=Path("gemma-4-31B-it"), config=inventory["config"], tensors=tensors,
                         shards=("model.safetensors",), files_to_copy=())
    plan = make_plan(source, FP8Scheme(64), ("model.vision_tower", "lm_head"), 5 * 10**9)
    assert round(source.nbytes / 1e9, 1) == 62.5
    assert len(plan.fp8_modules) == 411
    assert len(plan.tensors) == 1599
    assert round(plan.output_nbytes / 1e9, 1) == 33.3
    assert {m for m in plan.fp8_modules} == {t["name"][: -len(".weight")] for t in inventory["tensors"] if t["fp8"]}
    assert len(plan.kept_linears) == 190 and plan.modules_to_not_convert == ("model.vision_tower", "lm_head")
    assert arch.cross_check(plan) is None  # transformers 5.24 builds the same 411 FP8Linear modules
    assert [s.name for s in plan.shards][-1] == f"model-{len(plan.shards):05d}-of-{len(plan.shards):05d}.safetensors"
    assert all(s.nbytes <= 5 * 10**9 for s in plan.shards)



def _source_in(shards: tuple[str, ...]) -> SourceIndex:
    """Two 128x128 BF16 Linears and a norm, as stored in `shards` (headers only)."""
    tensors, offset = {}, 0
    for name, shape in [("model.layers.0.mlp.up_proj.weight", (128, 128)), ("model.norm.weight", (128,)),
                        ("model.layers.0.mlp.down_proj.weight", (128, 128))]:
        nbytes = 2 * math.prod(shape)
        tensors[name] = TensorInfo(name, "BF16", shape, shards[0], offset, nbytes)
        offset += nbytes
    return SourceIndex(root=Path("m"), config={"architectures": ["LlamaForCausalLM"]}, tensors=tensors,
                       shards=shards, files_to_copy=())


def test_single_file_source_whose_output_fits_one_shard_keeps_its_name():
    plan = make_plan(_source_in(("model.safetensors",)), FP8Scheme(64), (), 5 * 10**9)
    assert [s.name for s in plan.shards] == ["model.safetensors"] and plan.index_needed is False
    assert len(plan.shards[0].tensors) == 5  # two FP8 weights, their scales, the norm


def test_single_file_source_split_by_the_cap_gets_numbered_shards():
    plan = make_plan(_source_in(("model.safetensors",)), FP8Scheme(64), (), 20_000)
    assert [s.name for s in plan.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert plan.index_needed is True


def test_sharded_source_keeps_numbered_names_and_an_index_even_in_one_shard():
    plan = make_plan(_source_in(("model-00001-of-00001.safetensors",)), FP8Scheme(64), (), 5 * 10**9)
    assert [s.name for s in plan.shards] == ["model-00001-of-00001.safetensors"] and plan.index_needed is True
