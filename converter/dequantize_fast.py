"""The dequantization of `dequantize.dequantize_rows` as table lookups, compiled with numba.

An output value depends only on an E4M3 code (256 of them) and its block's inverse scale. So, per block of a
stripe, the formula itself is computed on all 256 codes (`table_of`), and the kernel only looks each code up in its
block's table, rows in parallel threads with the GIL released. Building the tables costs 256 products per block
(6% of a 64x64 block's 4096).

The tables are computed with numpy, not torch, so that a dequantization imports no torch (about 220 MB of resident
memory): each step is the one torch takes, bit for bit, NaN included: E4M3 decoded as c10's
`fp8e4m3fn_to_fp32_value`, a float32 product, then BF16 rounded to nearest even with every NaN as 0xFFFF (torch's
vectorized cast on x86; E4M3's NaN codes never come out of quantization), F16 as numpy's IEEE cast with NaNs
quieted (as F16C converts). Without numba, `available()` is False and callers
use the torch formula.
"""

from __future__ import annotations

import numpy as np

from .quantize_fast import available, numba

_kernels: dict = {}  # (output element size, parallel) -> compiled kernel
# Below this many codes a stripe is decoded on the calling thread: waking the kernel's threads costs more than the
# work (a per-expert MoE's tens of thousands of small weights)
PARALLEL_MIN_CODES = 1 << 20


def e4m3_values() -> np.ndarray:
    """float32 value of every E4M3 code, as torch casts `float8_e4m3fn` to float32 (its NaN bits too)."""
    w = np.arange(256, dtype=np.uint32) << np.uint32(24)
    sign, nonsign = w & np.uint32(0x80000000), w & np.uint32(0x7FFFFFFF)
    leading = np.array([32 - int(v).bit_length() for v in nonsign], np.uint32)  # count leading zeros
    shift = np.where(leading > 4, leading - 4, 0).astype(np.uint32)
    inf_nan = ((nonsign + np.uint32(0x01000000)).view(np.int32) >> 8).view(np.uint32) & np.uint32(0x7F800000)
    zero = ((nonsign.astype(np.int64) - 1) >> 31).astype(np.uint32)  # all ones where nonsign == 0
    body = ((nonsign << shift) >> np.uint32(4)) + ((np.uint32(0x78) - shift) << np.uint32(23))
    return (sign | ((body | inf_nan) & ~zero)).astype(np.uint32).view(np.float32)


_E4M3 = e4m3_values()


def e4m3_float32(codes: np.ndarray) -> np.ndarray:
    """float32 values of an array of E4M3 codes (uint8), as torch casts them."""
    return _E4M3[codes]


def float32_to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the bits of `dtype` ("BF16", "F16", "F32"), rounded as torch's `.to(dtype)` rounds."""
    if dtype == "F32":
        return values.view(np.uint32)
    if dtype == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            half = values.astype(np.float16).view(np.uint16)
        # a NaN as F16C converts it: sign, mantissa cut to its top 10 bits, quiet bit set
        bits = values.view(np.uint32)
        nan = ((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00) | ((bits >> np.uint32(13)) & np.uint32(0x3FF))
        return np.where(np.isnan(values), nan.astype(np.uint16), half)
    bits = values.view(np.uint32)
    rounded = (bits + (((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0xFFFF), rounded).astype(np.uint16)


def table_of(scale_inv: np.ndarray, dtype: str) -> np.ndarray:
    """Per block of `scale_inv` (float32 `(sr, sc)`), the bits of every E4M3 code dequantized to `dtype`:
    `(sr, sc, 256)`, by the formula of `dequantize.dequantize_rows`."""
    with np.errstate(invalid="ignore", over="ignore"):
        products = _E4M3[None, None, :] * scale_inv.astype(np.float32, copy=False)[:, :, None]
    return float32_to_bits(products, dtype)


def _make_kernel(parallel: bool):
    row_range = numba.prange if parallel else range

    def kernel(codes, tables, bm, bn, out):  # pragma: no cover - compiled
        rows, cols = codes.shape
        for r in row_range(rows):
            row_tables = tables[r // bm]
            for t in range(row_tables.shape[0]):
                table = row_tables[t]
                for c in range(t * bn, min(t * bn + bn, cols)):
                    out[r, c] = table[codes[r, c]]

    kernel.parallel = parallel
    return kernel


def _kernel(itemsize: int, parallel: bool = True):
    key = (itemsize, parallel)
    if key not in _kernels:
        from .quantize_fast import _compile

        kernel = _make_kernel(parallel)
        # one name per variant gives each its own on-disk cache index
        kernel.__qualname__ = kernel.__name__ = f"dequantize_lookup_{itemsize * 8}" + ("" if parallel else "_serial")
        try:
            _kernels[key] = _compile(kernel, cache=True)
        except RuntimeError:  # no writable cache folder: compiled for this process only
            _kernels[key] = _compile(kernel, cache=False)
    return _kernels[key]


def dequantize_into(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], dtype: str,
                    out: np.ndarray) -> None:
    """Dequantize a stripe of E4M3 codes into `out`, the bytes of `dequantize_rows`.

    Args:
        codes (`np.ndarray`): uint8 `(rows, cols)`, the stripe's first row the first row of a block.
        scale_inv (`np.ndarray`): float32 `(ceil(rows/bm), ceil(cols/bn))`.
        block (`tuple[int, int]`): `(bm, bn)`.
        dtype (`str`): "BF16", "F16" or "F32".
        out (`np.ndarray`): unsigned integers of `dtype`'s size, `(rows, cols)`, C-contiguous; receives the bits.
    """
    _kernel(out.itemsize, codes.size >= PARALLEL_MIN_CODES)(codes, table_of(scale_inv, dtype), block[0], block[1], out)


__all__ = ["available", "dequantize_into", "e4m3_float32", "e4m3_values", "float32_to_bits", "table_of"]
