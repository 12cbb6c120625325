"""The builtin Triton block-FP8 matmul, run by Triton's CPU interpreter: against float64 references, and called
by transformers' own FP8Linear. On a GPU the same check runs natively (`python -m converter.kernels.check`)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton): the kernel cannot run")


def run_check(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "converter.kernels.check", "--json", "--device", "cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_matches_float64_references_in_the_interpreter():
    results = run_check("--shapes", "1,64,64", "5,192,256", "33,128,320", "3,256,128")
    for r in results["shapes"]:
        assert r["rel_err_vs_emulated_f64"] < 1e-6, r  # same math, float32 accumulation only
        assert 0.005 < r["rel_err_vs_unquantized_f64"] < 0.05, r  # the cost of E4M3 activations
    linear = results["fp8linear"]
    assert linear["module"] == "FP8Linear" and linear["weight_dtype"] == "torch.float8_e4m3fn"
    assert linear["kernel_calls"] == 1  # transformers' own forward called the builtin kernel
    assert linear["rel_err_vs_emulated_bf16"] < 1e-2


def test_kernel_rejects_bad_arguments():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from converter.kernels.finegrained_fp8 import matmul_2d

    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="weight must be 2-D float8_e4m3fn"):
        matmul_2d(torch.zeros(1, 64), w.float(), torch.ones(1, 1), [64, 64])
    with pytest.raises(ValueError, match="square power-of-two blocks"):
        matmul_2d(torch.zeros(1, 64), w, torch.ones(1, 1), [64, 32])
    with pytest.raises(ValueError, match=r"weight_scale_inv \(2, 1\) does not match"):
        matmul_2d(torch.zeros(1, 64), w, torch.ones(2, 1), [64, 64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the native FP8 path needs a GPU")
def test_kernel_on_gpu_real_shapes():
    from converter.kernels.check import REAL_SHAPES, check_shape

    for shape in REAL_SHAPES:
        r = check_shape(*shape, device="cuda")
        assert r["rel_err_vs_emulated_f64"] < 1e-5 and r["rel_err_vs_unquantized_f64"] < 0.05, r


@pytest.mark.slow
def test_local_kernels_layout_loads_through_transformers(tmp_path):
    """`python -m converter.kernels.layout DIR` + LOCAL_KERNELS: transformers 5.17 with kernels 0.16 (the pair
    on our GPU machines) loads the builtin kernel as `kernels-community/finegrained-fp8`. Installs both from PyPI
    into a scratch folder."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
                          "kernels==0.16.2", "transformers==5.17.0"], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"cannot install transformers 5.17 and kernels 0.16.2 here: {pip.stderr[-300:]}")
    from converter.kernels.layout import write_layout

    variant = write_layout(tmp_path / "kernel")
    code = ("from transformers.integrations import finegrained_fp8 as f; k = f.load_finegrained_fp8_kernel(); "
            "print(k.matmul.__module__, k.matmul.__name__)")
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1",
               LOCAL_KERNELS=f"kernels-community/finegrained-fp8={variant}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("matmul_2d")
    assert done.stdout.startswith("_finegrained_fp8_convert_fp8_")
