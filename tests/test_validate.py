"""`convert-fp8 validate` on the CPU: transformers' dequantize path, end to end."""

import json
import shutil

import pytest
import torch
from torch import nn

from converter.kernels.loading import check_kernels_version
from converter.validate import compare_logits, forward_with_hooks

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
