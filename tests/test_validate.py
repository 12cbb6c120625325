"""`convert-fp8 validate` on the CPU: transformers' dequantize path, end to end."""

import json
import math
import shutil
import struct

import pytest
import torch
from torch import nn

from converter.kernels.loading import check_kernels_version
from converter.errors import UsageError
from converter.validate.compare import compare_embeddings, compare_logits, compare_outputs, pool, spearman
from converter.validate.engines.transformers import _main, _run_checked, forward_with_hooks
from converter.validate.kind import Pooling, model_kind
from converter.validate.report import Check, ValidateReport

from .conftest import run_cli
from .test_verify import patch

LAYER2_SCALE = "model.language_model.layers.2.self_attn.q_proj.weight_scale_inv"


def test_good_conversion_passes(gemma_src, gemma_dst, tmp_path):
    report_path = tmp_path / "validate.json"
    result = run_cli("validate", "--dst", gemma_dst, "--src", gemma_src, "--device", "cpu",
                     "--max-new-tokens", "5", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "[ok] fp8 path: 27 FP8 modules: all dequantized from their FP8 blocks and scales" in result.output
    assert "validate: OK" in result.output
    report = json.loads(report_path.read_text())
    assert report["ok"] is True and report["fp8_path"] == "dequantized" and report["first_non_finite"] is None
    assert report["logits"]["cosine_mean"] > 0.99 and report["logits"]["top1_agreement"] >= 0.8
    assert report["logits"]["kl_mean"] < 1e-3 and report["logits"]["positions"] == 17
    assert report["generation"]["new_tokens"] == 5


def test_inf_scale_in_layer_2_is_found_there(gemma_src, gemma_dst, tmp_path):
    dst = shutil.copytree(gemma_dst, tmp_path / "dst")
    patch(dst, LAYER2_SCALE, lambda t: t[0, 0].fill_(float("inf")))
    result = run_cli("validate", "--dst", dst, "--src", gemma_src, "--device", "cpu", "--max-new-tokens", "3")
    assert result.exit_code == 1, result.output
    assert ("[FAIL] finite outputs: first module with NaN/Inf output: model.language_model.layers.2.self_attn.q_proj"
            in result.output)
    report = json.loads((dst / "convert-fp8-validate.json").read_text())
    assert report["ok"] is False and report["first_non_finite"].startswith("model.language_model.layers.2.")
    # the scales were applied as stored: the loader did not silently dequantize differently
    assert any(c["name"] == "fp8 path" and c["ok"] for c in report["checks"])


def test_cuda_requested_without_a_gpu(gemma_dst, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("validate", "--dst", gemma_dst, "--device", "cuda", "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "[FAIL] device: --device cuda but torch sees no CUDA device; use --device cpu" in result.output


def test_kernels_version_messages():
    req = "kernels>=0.18.2,<0.19"
    assert check_kernels_version("0.18.3", req) == (True, "kernels 0.18.3 satisfies kernels>=0.18.2,<0.19")
    ok, msg = check_kernels_version("0.12.1", req)
    assert not ok and msg == "kernels 0.12.1 is installed but this transformers needs kernels>=0.18.2,<0.19: pip install 'kernels>=0.18.2,<0.19'"
    ok, msg = check_kernels_version(None, req)
    assert not ok and msg.startswith("the kernels package is not installed; this transformers needs kernels>=0.18.2")


def test_first_non_finite_module_is_the_innermost_first():
    class Poison(nn.Module):
        def forward(self, x):
            return x * float("inf")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.block = nn.Sequential(nn.Identity(), Poison(), nn.Linear(4, 4))

        def forward(self, input_ids):
            out = self.block(self.a(input_ids))
            return type("Out", (), {"logits": out})()

    _, bad = forward_with_hooks(Model(), {"input_ids": torch.ones(1, 4)})
    assert bad == ["block.1", "block.2", "block"]


def test_compare_logits_values():
    a = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    stats = compare_logits(a, a.clone())
    assert stats["cosine_mean"] == pytest.approx(1.0) and stats["top1_agreement"] == 1.0
    assert stats["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]]])
    assert compare_logits(a, b)["top1_agreement"] == 0.5


# --- every kind of model: encoders (plain and sentence-transformers), a classifier, a causal LM ---

KIND_CASES = {
    # name: (how the source is built, the scale planted with inf, the first module that goes non-finite)
    "sentence_transformers": (dict(), "encoder.layer.1.attention.self.query.weight_scale_inv",
                              "encoder.layer.1.attention.self.query"),
    "encoder": (dict(sentence_transformers=False), "encoder.layer.0.output.dense.weight_scale_inv",
                "encoder.layer.0.output.dense"),
    "classifier": (dict(sentence_transformers=False, head="BertForSequenceClassification"),
                   "bert.encoder.layer.1.intermediate.dense.weight_scale_inv",
                   "bert.encoder.layer.1.intermediate.dense"),
    "causal_lm": (None, "model.layers.1.mlp.up_proj.weight_scale_inv", "model.layers.1.mlp.up_proj"),
}


@pytest.fixture(scope="module", params=list(KIND_CASES))
def converted(request, tmp_path_factory):
    """(kind, source, converted output) for each kind of model, converted by the CLI."""
    from converter.demo import build_sentence_encoder

    from .conftest import tiny_llama

    work = tmp_path_factory.mktemp(request.param)
    build = KIND_CASES[request.param][0]
    if build is None:
        src, preset = tiny_llama(work / "src"), "llama"
    else:
        src, preset = build_sentence_encoder(work / "src", **build), "default"
    result = run_cli("--src", src, "--dst", work / "dst", "--config", preset, "-q")
    assert result.exit_code == 0, result.output
    return request.param, src, work / "dst"


def plant_inf(folder, scale_name):
    """Set the first inverse scale of `scale_name` to +inf, in place."""
    from converter.source import open_source

    info = open_source(folder).tensors[scale_name]
    with open(folder / info.shard, "r+b") as f:
        f.seek(info.offset)
        f.write(struct.pack("<f", math.inf))


def test_each_kind_passes_when_good(converted, tmp_path):
    kind, src, dst = converted
    report_path = tmp_path / "r.json"
    result = run_cli("validate", "--dst", dst, "--src", src, "--device", "cpu", "--max-new-tokens", "4",
                     "--min-embedding-cosine", "0.995", "--min-rank-correlation", "0.95", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "validate: OK" in result.output
    report = json.loads(report_path.read_text())
    assert report["first_non_finite"] is None and report["fp8_path"] == "dequantized"
    if kind == "sentence_transformers":
        assert ("[ok] kind: BertModel, sentence-transformers model (encoder): compares sentence embeddings; "
                "mean pooling, normalized (1_Pooling/config.json)") in result.output
        assert sorted(p.name for p in dst.glob("model*")) == ["model.safetensors"]  # as the source: no index
    if kind == "encoder":
        assert "[ok] kind: BertModel, text encoder (encoder): compares sentence embeddings; mean pooling (default)" \
            in result.output
    if kind in ("sentence_transformers", "encoder"):
        stats = report["embeddings"]
        assert stats["sentences"] == 6 and stats["pairs"] == 15 and stats["dim"] == 128
        assert stats["cosine_min"] > 0.999 and stats["rank_correlation"] > 0.95 and stats["nearest_agreement"] == 1
        assert stats["thresholds"] == {"min_embedding_cosine": 0.995, "min_rank_correlation": 0.95}
        assert report["logits"] is None and report["generation"] is None
    if kind == "classifier":
        assert "BertForSequenceClassification, sequence classification (head)" in result.output
        stats = report["head_output"]
        assert stats["name"] == "logits" and stats["rows"] == 6  # one row of 3 labels per sentence
        assert stats["cosine_min"] > 0.99 and stats["top1_agreement"] == 1.0 and stats["relative_error"] < 0.1
    if kind == "causal_lm":
        assert "[ok] kind: LlamaForCausalLM, causal LM (generative)" in result.output
        assert report["logits"]["cosine_mean"] > 0.99 and report["logits"]["top1_agreement"] >= 0.8
        assert report["generation"]["new_tokens"] == 4


def test_each_kind_fails_with_an_inf_scale_naming_the_first_bad_module(converted, tmp_path):
    kind, src, dst = converted
    _, scale, first_bad = KIND_CASES[kind]
    dst = shutil.copytree(dst, tmp_path / "dst")
    plant_inf(dst, scale)
    result = run_cli("validate", "--dst", dst, "--src", src, "--device", "cpu", "--max-new-tokens", "2")
    assert result.exit_code == 1, result.output
    assert f"[FAIL] finite outputs: first module with NaN/Inf output: {first_bad} (" in result.output
    report = json.loads((dst / "convert-fp8-validate.json").read_text())
    assert report["first_non_finite"] == first_bad
    # the verdict does not hang on the comparison: torch's CPU attention turns a NaN query into zeros, so an inf
    # scale in a query projection can leave the final embeddings finite and close to the source's
    assert "validate: FAILED (finite outputs" in result.output


@pytest.mark.parametrize("arch, kind, task", [
    ("LlamaForCausalLM", "generative", "causal LM"),
    ("Gemma4ForConditionalGeneration", "generative", "causal LM"),
    ("BertModel", "encoder", "text encoder"),
    ("LlamaModel", "encoder", "base model"),
    ("BertForSequenceClassification", "head", "sequence classification"),
    ("BertForMaskedLM", "head", "masked LM"),
    ("T5ForConditionalGeneration", "head", "seq2seq LM"),
    ("T5Model", "head", "base model"),  # an encoder-decoder: its main output, not sentence embeddings
])
def test_kind_from_transformers_auto_classes(arch, kind, task, tmp_path):
    found = model_kind(tmp_path, {"architectures": [arch], "is_encoder_decoder": arch.startswith("T5")})
    assert (found.kind, found.task, found.auto_model) == (kind, task, False)
    assert (found.pooling is not None) == (kind == "encoder")


def test_sentence_transformers_folder_is_an_encoder_whatever_its_head(tmp_path):
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}))
    found = model_kind(tmp_path, {"architectures": ["Qwen3ForCausalLM"]})
    assert found.kind == "encoder" and found.auto_model is True
    assert found.pooling == Pooling(("lasttoken",), False, "1_Pooling/config.json", ("Dense (2_Dense)",))


@pytest.mark.parametrize("arch, message", [
    ("ViTForImageClassification", "is an image classification model, taking pixel_values"),
    ("WhisperForConditionalGeneration", "is a speech seq 2 seq model, taking input_features"),
    ("BertForMultipleChoice", "is a multiple choice model;"),
])
def test_kinds_it_cannot_judge_are_refused(arch, message, tmp_path):
    with pytest.raises(UsageError, match="^cannot validate this kind: ") as exc:
        model_kind(tmp_path, {"architectures": [arch]})
    assert f"{arch} ({tmp_path}/config.json) {message}" in str(exc.value)


def test_cannot_validate_is_one_line_and_exit_2(gemma_dst, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    config = json.loads((gemma_dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, architectures=["ViTForImageClassification"])))
    result = run_cli("validate", "--dst", dst, "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"convert-fp8: error: cannot validate this kind: ViTForImageClassification ({dst}/config.json) is an image "
        "classification model, taking pixel_values; validate runs text models: causal LMs, image-text models, "
        "encoders, and classification, masked-LM, question-answering or seq2seq heads"]


def test_pooling_modes_are_sentence_transformers_own():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last token is padding
    assert pool(hidden, mask, Pooling(("mean_tokens",), False, "t")).tolist() == [2.0, 1.0]
    assert pool(hidden, mask, Pooling(("cls_token", "max_tokens"), False, "t")).tolist() == [1.0, 0.0, 3.0, 2.0]
    assert pool(hidden, mask, Pooling(("lasttoken",), False, "t")).tolist() == [3.0, 2.0]
    assert pool(hidden, mask, Pooling(("weightedmean_tokens",), False, "t")).tolist() == pytest.approx([7 / 3, 4 / 3])
    assert pool(hidden, mask, Pooling(("mean_tokens",), True, "t")).tolist() == pytest.approx([0.8944272, 0.4472136])


def test_compare_embeddings_ranks_pair_similarities():
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.3]])
    same = compare_embeddings(ref * 2, ref)  # scale does not matter, order of similarities is kept
    assert same["cosine_min"] == pytest.approx(1.0) and same["rank_correlation"] == pytest.approx(1.0)
    assert same["pairs"] == 6 and same["nearest_agreement"] == 1.0
    swapped = compare_embeddings(ref[[0, 2, 1, 3]], ref)
    assert swapped["nearest_agreement"] == 0.0 and swapped["rank_correlation"] < 0.5
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, math.inf]), torch.tensor([1.0, 2.0])))


def test_a_forward_pass_that_raises_is_a_failed_check():
    class Broken(nn.Module):
        def forward(self, input_ids):
            raise IndexError("index out of range in self")

    report = ValidateReport(dst="d", src=None, device="cpu", kernel="hub")
    assert _run_checked(report, Broken(), [{"input_ids": torch.ones(1, 2)}], _main, "6 sentences") is None
    assert report.checks == [Check("forward", False, "the forward pass failed (6 sentences): IndexError: index out "
                                                     "of range in self")]


def test_a_non_finite_row_never_agrees_on_top1():
    ref = torch.tensor([[0.5, 0.1, 0.0], [0.4, 0.3, 0.0]])
    fp8 = torch.tensor([[float("nan")] * 3, [0.4, 0.2, 0.1]])
    assert compare_logits(fp8, ref)["top1_agreement"] == 0.5
    assert compare_outputs(fp8, ref)["top1_agreement"] == 0.5 and compare_outputs(fp8, ref)["finite"] is False
