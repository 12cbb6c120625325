"""The fused numba kernel: the same bytes as transformers' formula, on every BF16 value and on edge tiles."""

import logging

import numpy as np
import pytest
import torch

from converter import quantize_fast
from converter.quantize import quantize_blocks

from .conftest import run_cli, tiny_llama, tree_digest
from .test_quantize import TIES, reference, tie_tile, tie_tiles, torch_cast

pytestmark = pytest.mark.skipif(not quantize_fast.available(), reason="numba is not installed")


def fast(weight: torch.Tensor, block: int = 64):
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[weight.dtype]
    raw = weight.contiguous().view(torch.uint8).numpy().reshape(-1)
    out = np.empty(weight.shape, np.uint8)
    scales = np.empty((weight.shape[0] // block, weight.shape[1] // block), np.float32)
    status = quantize_fast.quantize_into(raw, code, out, scales, block)
    return out, scales, status


def test_every_finite_bf16_value_in_every_position():
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits)]
    values = values[values.float().abs() > 1e-30]  # tiles of only float32-subnormal amax are refused (tested below)
    for seed in range(3):
        order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
        n = len(values) // (64 * 256) * (64 * 256)
        w = values[order][:n].reshape(-1, 256)
        out, scales, status = fast(w)
        ref_fp8, ref_scale = reference(w, 64)
        assert status == (quantize_fast.OK, 0)
        assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy())
        assert np.array_equal(scales.view(np.int32), ref_scale.numpy().view(np.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("exponent", [-20, -6, 0, 6])
@pytest.mark.parametrize("block", [64, 128])
def test_edge_tiles_match_transformers(dtype, exponent, block):
    gen = torch.Generator().manual_seed(exponent + 100)
    w = torch.randn(256, 384, generator=gen) * 2.0 ** (exponent if dtype != torch.float16 else max(exponent, -6))
    w[:64, :64] = 0
    w[70, 300] = w.abs().max() * 50
    w = w.to(dtype)
    out, scales, status = fast(w, block)
    assert status == (quantize_fast.OK, 0)
    ref_fp8, ref_scale = quantize_blocks(w, block)
    assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy())
    assert np.array_equal(scales, ref_scale.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_ties_and_negative_zero_match_torchs_cast(dtype):
    w, counts = tie_tiles(dtype)
    assert min(counts) >= 4, counts
    out, scales, status = fast(w)
    assert status == (quantize_fast.OK, 0)
    assert np.array_equal(out, torch_cast(w).numpy())
    assert fast(tie_tile(dtype))[0][0, : len(TIES)].tolist() == list(TIES.values())
    zeros = torch.zeros(64, 128, dtype=dtype)
    zeros[:, 64:] = -0.0  # amax 0: scale 1, each value cast as it is
    zeros[3, 5] = -0.0
    out, scales, _ = fast(zeros)
    assert out[3, 5] == 0x80 and out[4, 5] == 0x00 and (out[:, 64:] == 0x80).all()
    assert np.array_equal(out, zeros.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    assert scales.tolist() == [[1.0, 1.0]]


def test_non_finite_and_overflowing_tiles_are_reported_with_their_row():
    w = torch.zeros(192, 128, dtype=torch.bfloat16)
    w[130, 5] = float("inf")
    assert fast(w)[2] == (quantize_fast.NON_FINITE, 128)
    w = torch.zeros(192, 128, dtype=torch.float32)
    w[70, 5] = 1e-39
    assert fast(w)[2] == (quantize_fast.SCALE_OVERFLOW, 64)


def test_numba_and_torch_quantizers_write_the_same_files(tmp_path):
    src = tiny_llama(tmp_path / "src")
    for kind in ("numba", "torch"):
        result = run_cli("--src", src, "--dst", tmp_path / kind, "--quantizer", kind)
        assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "numba") == tree_digest(tmp_path / "torch")


@pytest.fixture
def fresh_kernels(monkeypatch):
    """No kernel compiled in this process yet, and none known to lack a cache (restored after the test)."""
    monkeypatch.setattr(quantize_fast, "_kernels", {})
    monkeypatch.setattr(quantize_fast, "_uncached", False)


def cache_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "converter.quantize_fast"]


def test_without_a_writable_cache_folder_the_kernels_compile_for_the_run(fresh_kernels, monkeypatch, caplog):
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # as where no cache folder can be written
    w = (torch.randn(128, 192, generator=torch.Generator().manual_seed(11)) * 0.02).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="converter.quantize_fast"):
        out, scales, status = fast(w)
        again = fast(w)[0]
    assert status == (quantize_fast.OK, 0)
    ref_fp8, ref_scale = quantize_blocks(w, 64)
    assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy()) and np.array_equal(scales, ref_scale.numpy())
    assert np.array_equal(again, out)
    notes = cache_notes(caplog)
    assert len(notes) == 1 and notes[0].startswith("numba cannot cache its compiled kernels here (neither the "
                                                   "package folder, NUMBA_CACHE_DIR nor the user cache folder")


def test_a_cache_file_that_cannot_be_written_compiles_for_the_run(fresh_kernels, monkeypatch, caplog):
    from numba.core import caching

    def refuse(self, key, data):
        raise PermissionError(13, "Permission denied", f"{self._cache_path}/{self._index_name}")

    monkeypatch.setattr(caching.IndexDataCacheFile, "load", lambda self, key: None)  # a miss: compile, then save
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", refuse)  # an index another user owns, a full disk
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(12)) * 3).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="converter.quantize_fast"):
        out, _, status = fast(w)
    assert status == (quantize_fast.OK, 0)
    assert np.array_equal(out, quantize_blocks(w, 64)[0].view(torch.uint8).numpy())
    notes = cache_notes(caplog)
    assert len(notes) == 1 and "quantize_tiles_shift16_block64" in notes[0] and "Permission denied" in notes[0]


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_between_kernel_calls_unless_told_otherwise(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", "import os, converter.quantize_fast; "
                           "print(os.environ['OMP_WAIT_POLICY'])"], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == expected, done.stderr
