"""The quantization kernel against transformers' own `Fp8Quantize`, byte for byte."""

import pytest
import torch
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

from converter.quantize import FP8_MAX, NonFiniteError, dequantize_blocks, quantize_blocks, scale_shape, tiles_evenly


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


def e4m3_ties(scale: torch.Tensor, dtype: torch.dtype, amax: float) -> torch.Tensor:
    """Every `dtype` value w with |w| < amax whose product with `scale` (float32, exact) lies exactly halfway
    between two neighbouring E4M3 values, with both signs."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    halfway = (codes[:-1] + codes[1:]) / 2
    halfway = torch.cat([halfway, -halfway])
    w = (halfway / scale).to(dtype)
    exact = (w.float() * scale == halfway) & (w.float().abs() < amax)
    return w[exact]


def tie_tiles(dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """One 64x64 tile per amax, the amax first and then ties. amax 448 gives the scale 1.0 (a tie at every
    midpoint); a power-of-two amax gives the scale 7 * 2**n, whose ties are the odd multiples of 21 and 7."""
    tiles, counts = [], []
    for amax in (448.0, 1.0, 2.0**-4, 2.0**6, 2.0**-9):
        scale = torch.reciprocal(torch.tensor(amax)) * 448  # as the formula computes it
        ties = e4m3_ties(scale, dtype, amax)
        counts.append(len(ties))
        flat = torch.cat([torch.tensor([amax], dtype=dtype), ties.repeat(4096 // max(len(ties), 1) + 1)])[:4096]
        tiles.append(flat.reshape(64, 64))
    return torch.cat(tiles, dim=1), counts


def torch_cast(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """E4M3 bytes by torch's own cast of each value times its tile's scale (a product that is exact here)."""
    rows, cols = weight.shape
    tiles = weight.float().reshape(rows // block, block, cols // block, block)
    scale = torch.reciprocal(tiles.abs().amax(dim=(1, 3))) * FP8_MAX
    return (tiles * scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_ties_round_to_even_as_torch_casts(dtype):
    w, counts = tie_tiles(dtype)
    assert min(counts) >= 4, counts  # every tile holds ties
    fp8, scale_inv = assert_same_bytes(w)
    assert torch.equal(fp8.view(torch.uint8), torch_cast(w))
    assert scale_inv[0, 0].item() == 1.0  # amax 448: the values are cast as they are


# Ties in a tile of amax 448 (scale 1.0) and their E4M3 bytes: 17 -> 16 and 19 -> 20 (to the even mantissa),
# 31 -> 32 (the carry moves into the exponent), 2**-10 -> 0 and 3 * 2**-10 -> 2**-8 among the subnormals,
# -2**-10 -> -0.0.
TIES = {17.0: 0x58, 19.0: 0x5A, 31.0: 0x60, -17.0: 0xD8, 2.0**-10: 0x00, 3 * 2.0**-10: 0x02, -(2.0**-10): 0x80,
        -(5 * 2.0**-10): 0x82}


def tie_tile(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    w = torch.full((64, 64), 448.0)
    w[0, : len(TIES)] = torch.tensor(list(TIES))
    return w.to(dtype)


def test_tie_bytes():
    fp8, _ = quantize_blocks(tie_tile(), 64)
    assert fp8[0, : len(TIES)].view(torch.uint8).tolist() == list(TIES.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_negative_zero_keeps_its_sign(dtype):
    w = torch.zeros(64, 192)
    w[:, 64:128] = -0.0  # a tile of only -0.0: amax 0, scale 1
    w[:, 128:] = 1.0
    w[0, 0], w[5, 130], w[6, 131] = -0.0, -0.0, -(2.0**-20)  # -2**-20 * 448 rounds to -0.0
    w = w.to(dtype)
    fp8, _ = assert_same_bytes(w)
    codes = fp8.view(torch.uint8)
    assert codes[0, 0] == 0x80 and codes[1, 0] == 0x00 and codes[:, 64:128].eq(0x80).all()
    assert codes[5, 130] == 0x80 and codes[6, 131] == 0x80
    # torch's own cast: of the values themselves in all-zero tiles (scale 1), of the scaled values elsewhere
    assert torch.equal(codes[:, :128], w[:, :128].float().to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(codes[:, 128:], torch_cast(w[:, 128:]))
