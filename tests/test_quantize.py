"""The quantization kernel against transformers' own `Fp8Quantize`, byte for byte."""

import pytest
import torch
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

from converter.quantize import NonFiniteError, dequantize_blocks, quantize_blocks, scale_shape, tiles_evenly


def transformers_quantize(name: str, tensor: torch.Tensor, block: int) -> dict:
    """transformers' own `Fp8Quantize` on one named tensor: its output tensors by name."""
    class Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=(block, block))

    return Fp8Quantize(Quantizer()).convert({name: tensor})


def reference(weight: torch.Tensor, block: int):
    """(FP8, weight_scale_inv) of a Linear weight, by transformers."""
    out = transformers_quantize("m.weight", weight, block)
    return out["m.weight"], out["m.weight_scale_inv"]


def assert_same_bytes(weight, block=64):
    fp8, scale_inv = quantize_blocks(weight, block)
    ref_fp8, ref_scale = reference(weight, block)
    assert fp8.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert torch.equal(fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    assert torch.equal(scale_inv.view(torch.int32), ref_scale.view(torch.int32))
    return fp8, scale_inv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bytes_match_transformers_with_zero_outlier_and_tiny_tiles(dtype):
    torch.manual_seed(1)
    w = torch.randn(320, 448) * 0.02
    w[:64, :64] = 0  # all-zero tile: scale 1, no NaN
    w[70, 300] = 250.0  # outlier
    w[128:192, 64:128] *= 1e-4 if dtype == torch.float16 else 1e-20  # tiny but normal values
    w[200, 10] = -448.0
    fp8, scale_inv = assert_same_bytes(w.to(dtype))
    assert scale_inv[0, 0].item() == 1.0
    assert fp8[:64, :64].view(torch.uint8).eq(0).all()
    assert scale_inv.shape == (5, 7)


def test_bytes_match_transformers_on_many_random_tensors():
    gen = torch.Generator().manual_seed(7)
    for rows, cols, std in [(64, 64, 1.0), (128, 64, 0.02), (192, 256, 3e-3), (64, 640, 10.0)]:
        w = (torch.randn(rows, cols, generator=gen) * std).to(torch.bfloat16)
        assert_same_bytes(w)


def test_bytes_match_transformers_with_128_blocks():
    w = (torch.randn(256, 384, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    fp8, scale_inv = quantize_blocks(w, 128)
    ref_fp8, ref_scale = reference(w, 128)
    assert torch.equal(fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    assert torch.equal(scale_inv, ref_scale)


def test_stripes_give_the_same_bytes_as_the_whole_tensor():
    w = (torch.randn(384, 192, generator=torch.Generator().manual_seed(5)) * 0.1).to(torch.bfloat16)
    whole_fp8, whole_scale = quantize_blocks(w, 64)
    parts = [quantize_blocks(w[r : r + 128], 64) for r in range(0, 384, 128)]
    assert torch.equal(torch.cat([p[0] for p in parts]).view(torch.uint8), whole_fp8.view(torch.uint8))
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_scale)


def test_reconstruction_error_is_small():
    w = (torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    fp8, scale_inv = quantize_blocks(w, 64)
    rel = (dequantize_blocks(fp8, scale_inv, 64) - w.float()).norm() / w.float().norm()
    assert rel.item() < 0.03  # E4M3 with per-tile scales: about 2.6% on N(0, 0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_with_their_row(bad):
    w = torch.zeros(192, 64)
    w[130, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf") as info:
        quantize_blocks(w, 64)
    assert info.value.row == 128


def test_subnormal_tile_whose_scale_overflows_is_refused():
    w = torch.zeros(64, 64)
    w[0, 0] = 1e-39  # float32 subnormal: 1/amax overflows to inf and transformers writes NaN
    with pytest.raises(NonFiniteError, match="subnormal"):
        quantize_blocks(w, 64)


def test_shapes_that_do_not_tile():
    assert tiles_evenly((128, 64), 64) and not tiles_evenly((100, 64), 64) and not tiles_evenly((64,), 64)
    assert scale_shape((4304, 1152), 64) == (68, 18)
    with pytest.raises(ValueError, match="does not tile"):
        quantize_blocks(torch.zeros(100, 64), 64)
