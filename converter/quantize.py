"""Block FP8 quantization, bit-identical to transformers' `Fp8Quantize` (5.23+). Pure functions, no I/O.

Per `block x block` tile, in float32:

    amax  = max(|w|)
    scale = RN(RN(1 / amax) * 448)           (1.0 for an all-zero tile)
    q     = e4m3_RNE(clamp(RN(w * scale), -448, 448))
    weight_scale_inv = RN(1 / scale)

`448 / t` in torch is `t.reciprocal() * 448`: two roundings, which we spell out so that no refactoring to a
"cleaner" single division changes a byte. It multiplies by `scale` and never divides by `weight_scale_inv`.
"""

from __future__ import annotations

import torch

from .configs import FP8_MAX, scale_shape, tiles_evenly  # noqa: F401 - re-exported with the kernel

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
}


class NonFiniteError(ValueError):
    """A stripe holds NaN or Inf, or a tile whose scale overflows; `row` is the first offending row."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


def quantize_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight (or a stripe of whole tile rows of one) to E4M3 with per-tile inverse scales.

    Args:
        weight (`torch.Tensor`): BF16, F16 or F32, shape `(rows, cols)`, both multiples of `block_size`.
        block_size (`int`): tile edge.

    Returns:
        `(fp8, scale_inv)`: `float8_e4m3fn` of `weight`'s shape, and float32 `(rows/block, cols/block)`.

    Raises:
        NonFiniteError: `weight` holds NaN or Inf, or a tile so small (float32-subnormal amax) that its scale
            overflows; transformers would write NaN there.
    """
    rows, cols = weight.shape
    if rows % block_size or cols % block_size:
        raise ValueError(f"shape {tuple(weight.shape)} does not tile by {block_size}")
    tile_rows, tile_cols = rows // block_size, cols // block_size
    tiles = weight.to(torch.float32).reshape(tile_rows, block_size, tile_cols, block_size)
    amax = tiles.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        bad_tile_row = int((~torch.isfinite(amax)).any(dim=1).nonzero()[0, 0])
        raise NonFiniteError("holds NaN or Inf", row=bad_tile_row * block_size)
    nonzero = amax > 0
    scale = torch.where(nonzero, torch.reciprocal(torch.where(nonzero, amax, 1.0)) * FP8_MAX, 1.0)
    if not torch.isfinite(scale).all():
        bad_tile_row = int((~torch.isfinite(scale)).any(dim=1).nonzero()[0, 0])
        raise NonFiniteError("has a tile of float32-subnormal values whose scale overflows", row=bad_tile_row * block_size)
    scale_inv = torch.reciprocal(scale)
    scaled = tiles * scale[:, None, :, None]
    fp8 = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(rows, cols)
    return fp8, scale_inv


def dequantize_blocks(fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 reconstruction: each tile's E4M3 values times its inverse scale."""
    rows, cols = fp8.shape
    tiles = fp8.to(torch.float32).reshape(rows // block_size, block_size, cols // block_size, block_size)
    return (tiles * scale_inv[:, None, :, None]).reshape(rows, cols)
